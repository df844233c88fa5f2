"""Which of a killed run's saved checkpoints a resume continues from: the newest one written to the end
(fast; killing and resuming a real run is tests/test_reliability.py)."""

from __future__ import annotations

from bonebreak.training.trainer import last_complete_checkpoint


def test_last_complete_checkpoint_ignores_partial_saves(tmp_path):
    for step, files in ((4, ["trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt"]),
                        (8, ["model.safetensors", "optimizer.pt"]), (12, [])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "checkpoint-12") is None
