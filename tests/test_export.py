"""ONNX export and the ONNX Runtime backend of the Predictor, the CLI and the app."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHIPPED_MODEL

from bonebreak.export import ONNX_FILE, WEIGHTS_HASH_KEY, OnnxForward, export_onnx, load_onnx, weights_sha256
from bonebreak.inference import Predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A copy of the shipped checkpoint, freshly exported (not the committed model.onnx)."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns(ONNX_FILE, "eval_*"))
    report = export_onnx(folder)
    assert max(report["max_probability_difference"].values()) <= 1e-4
    return folder


def real_images(handful: Path, n: int = 12) -> list[Path]:
    """Real X-rays spread over the classes of the committed fixture (every third of its 40 files)."""
    files = sorted(handful.rglob("*.jpg"))[::3][:n]
    assert len(files) == n
    return files


def test_onnx_matches_pytorch_on_real_images_at_any_batch_size(exported, handful):
    files = real_images(handful)
    eager = Predictor.from_checkpoint(exported, device="cpu", backend="torch", calibrated=False)
    onnx = Predictor.from_checkpoint(exported, device="cpu", backend="onnx", calibrated=False)
    assert (eager.backend, onnx.backend) == ("torch", "onnx")
    for batch_size in (1, 5):  # dynamic batch axis
        difference = np.abs(onnx.probabilities(files, batch_size) - eager.probabilities(files, batch_size)).max()
        assert difference <= 1e-4
    runner = load_onnx(exported)
    assert runner.metadata[WEIGHTS_HASH_KEY] == weights_sha256(exported)
    input_shape = runner.session.get_inputs()[0].shape
    assert isinstance(input_shape[0], str) and input_shape[1:] == [3, 224, 224]


def test_stale_or_missing_onnx_is_refused_by_onnx_and_skipped_by_auto(exported, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    from safetensors.torch import load_file, save_file

    weights = load_file(stale / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0  # as if retrained after the export
    save_file(weights, stale / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different weights.*python -m bonebreak.export --onnx"):
        Predictor.from_checkpoint(stale, device="cpu", backend="onnx", calibrated=False)
    assert Predictor.from_checkpoint(stale, device="cpu", backend="auto", calibrated=False).backend == "torch"

    (stale / ONNX_FILE).unlink()
    with pytest.raises(ValueError, match="model.onnx not found"):
        Predictor.from_checkpoint(stale, device="cpu", backend="onnx", calibrated=False)
    with pytest.raises(ValueError, match="--backend must be one of"):
        Predictor.from_checkpoint(stale, backend="tensorrt")


def test_export_refuses_a_disagreeing_model_and_leaves_no_file(exported, tmp_path):
    with pytest.raises(ValueError, match="disagrees with PyTorch"):
        export_onnx(exported, tmp_path / "strict.onnx", tolerance=1e-12)
    assert not (tmp_path / "strict.onnx").exists()


def test_tiny_vit_exports_too(tiny_vit, tmp_path):
    folder = tmp_path / "vit"
    shutil.copytree(tiny_vit, folder)
    export_onnx(folder)
    runner = OnnxForward(folder / ONNX_FILE)
    assert tuple(runner(torch.zeros(2, 3, 64, 64)).shape) == (2, 3)


def test_export_cli_needs_a_format_and_names_it():
    result = subprocess.run([sys.executable, "-m", "bonebreak.export"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "--onnx" in result.stderr


def test_predict_cli_backends_agree(exported, handful, capsys):
    from bonebreak.predict import main

    files = [str(p) for p in real_images(handful, 4)]
    outputs = {}
    for backend in ("torch", "onnx"):
        assert main(["--model_path", str(exported), "--backend", backend, "--format", "json", *files]) == 0
        outputs[backend] = capsys.readouterr().out
    import json

    torch_rows, onnx_rows = (json.loads(outputs[b]) for b in ("torch", "onnx"))
    for a, b in zip(torch_rows, onnx_rows):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert np.allclose([p["probability"] for p in a["predictions"]], [p["probability"] for p in b["predictions"]], atol=1e-4)


def test_shipped_onnx_is_current_so_auto_serves_it():
    # A retrained checkpoint without a re-export would silently lose the ONNX speed-up.
    assert load_onnx(SHIPPED_MODEL).metadata[WEIGHTS_HASH_KEY] == weights_sha256(SHIPPED_MODEL)
    assert Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend="auto", calibrated=False).backend == "onnx"


def test_training_writes_a_current_onnx_copy(trained_vit):
    assert load_onnx(trained_vit).metadata[WEIGHTS_HASH_KEY] == weights_sha256(trained_vit)
    assert Predictor.from_checkpoint(trained_vit, device="cpu", backend="auto").backend == "onnx"


def test_a_damaged_onnx_file_is_named_not_a_crash(exported, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    (damaged / ONNX_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="cannot be loaded"):
        Predictor.from_checkpoint(damaged, device="cpu", backend="onnx", calibrated=False)
    assert Predictor.from_checkpoint(damaged, device="cpu", backend="auto", calibrated=False).backend == "torch"


def test_xray_check_runs_on_onnx_runtime_with_the_same_scores(handful):
    files = real_images(handful, 6)
    eager = Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend="torch")
    onnx = Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend="onnx")
    torch_scores, onnx_scores = eager.ood_scores(files), onnx.ood_scores(files)
    assert onnx.embedder.features is not None and eager.embedder.features is None
    assert np.abs(torch_scores - onnx_scores).max() <= 1e-4
