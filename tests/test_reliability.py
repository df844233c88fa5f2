"""Killed training resumes; checkpoints are never half-written; broken training files are skipped.
(Which saved checkpoint a resume picks is tests/test_resume_point.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonebreak.commands.train import main
from bonebreak.common.checkpoint_format import ModelLoadError
from bonebreak.models.checkpoints import load_checkpoint, save_checkpoint
from conftest import REPO


def wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before it could be killed:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out waiting for a checkpoint")


def test_sigkill_mid_epoch_then_resume_finishes(handful, tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", str(handful), "--model", "efficientnet_lite0", "--image_size", "64", "--epochs", "3",
            "--batch_size", "2", "--eval_strategy", "steps", "--eval_steps", "5", "--save_strategy", "steps", "--save_steps", "5", "--output_dir", str(out), "--num_workers", "0",
            "--early_stopping_patience", "0", "--no_evaluate_test"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    work = Path(f"{out}.trainer")
    # 20 training images / batch 2 = 10 steps per epoch: step 5 is the middle of epoch 1.
    wait_for(lambda: (work / "checkpoint-5" / "trainer_state.json").is_file(), 300, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing final was written by the killed run
    killed_at = max(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*"))
    assert killed_at < 30

    # A kill while saving leaves a partial folder: resume must skip it, not crash on it.
    partial = work / f"checkpoint-{killed_at + 1}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"half")

    with pytest.raises(ValueError, match="--resume"):
        main(args)
    summary = main(args + ["--resume"])
    assert summary["global_step"] == 30
    history = json.loads((out / "log_history.json").read_text())
    first_evals = [e["step"] for e in history if "eval_loss" in e]
    assert first_evals.count(5) == 1  # the evaluation before the kill is kept, not redone
    assert summary["best_checkpoint"] is not None
    model, _ = load_checkpoint(out)
    assert model.config.num_labels == 10


def test_crash_while_saving_keeps_the_old_checkpoint(trained_vit, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    shutil.copytree(trained_vit, target)
    model, processor = load_checkpoint(target)
    before = (target / "model.safetensors").read_bytes()

    def crash(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, processor, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    load_checkpoint(target)


def test_only_safetensors_are_loaded_never_pickles(trained_vit, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(trained_vit, target)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be opened")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_checkpoint(target)
    files = sorted((REPO / "bonebreak").rglob("*.py"))
    assert len(files) > 50 and REPO / "bonebreak" / "models" / "checkpoints.py" in files  # every sub-package's code
    sources = "".join(p.read_text() for p in files)
    assert "trust_remote_code=True" not in sources
    assert sources.count("torch.load(") == sources.count("weights_only=True)")


def test_training_skips_and_lists_broken_files(handful, tiny_vit, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(handful, data)
    (data / "Spiral Fracture" / "Train" / "zero.jpg").write_bytes(b"")
    (data / "Oblique fracture" / "Train" / "note.png").write_text("<html>not an image</html>")
    out = tmp_path / "run"
    main(["--data_dir", str(data), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8",
          "--output_dir", str(out), "--num_workers", "0", "--no_evaluate_test"])
    skipped = json.loads((out / "metrics.json").read_text())["skipped_files"]
    assert sorted(Path(s["path"]).name for s in skipped) == ["note.png", "zero.jpg"]
    assert all(s["reason"] for s in skipped)
