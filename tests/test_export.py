"""ONNX export and the ONNX Runtime backend of the Predictor, the CLI and the app."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHIPPED_MODEL

from bonebreak.onnx_backend import ONNX_FILE, WEIGHTS_HASH_KEY, OnnxForward, export_onnx, load_onnx, weights_sha256
from bonebreak.inference import Predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A copy of the shipped checkpoint, freshly exported (not the committed model.onnx)."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns(ONNX_FILE, "eval_*"))
    report = export_onnx(folder)
    assert max(report["max_probability_difference"].values()) <= 1e-4
    assert report["outputs"] == ["logits", "features"]  # the heat map comes from the same forward pass
    assert max(report["max_relative_feature_difference"].values()) <= 1e-4
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
    with pytest.raises(ValueError, match="different weights.*python -m bonebreak.export --model_path"):
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
    assert export_onnx(folder)["outputs"] == ["logits"]  # tokens, no pooled feature map: Grad-CAM stays on PyTorch
    runner = OnnxForward(folder / ONNX_FILE)
    assert tuple(runner(torch.zeros(2, 3, 64, 64)).shape) == (2, 3)


def test_export_cli_writes_a_current_onnx_copy_and_names_a_bad_folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns(ONNX_FILE, "eval_*"))
    result = subprocess.run([sys.executable, "-m", "bonebreak.export", "--model_path", str(folder)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(folder / ONNX_FILE) and report["outputs"] == ["logits", "features"]
    assert load_onnx(folder).metadata[WEIGHTS_HASH_KEY] == weights_sha256(folder)
    missing = subprocess.run([sys.executable, "-m", "bonebreak.export", "--model_path", str(tmp_path / "nothing")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and f"{tmp_path / 'nothing'} not found" in missing.stderr


def test_predict_cli_backends_agree(exported, handful, capsys):
    from bonebreak.predict import main

    files = [str(p) for p in real_images(handful, 4)]
    outputs = {}
    for backend in ("torch", "onnx"):
        assert main(["--model_path", str(exported), "--backend", backend, "--format", "json", *files]) == 0
        outputs[backend] = capsys.readouterr().out
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


def test_xray_check_separates_photos_from_xrays_alike_on_onnx_runtime_and_pytorch(handful):
    from bonebreak.ood import DEFAULT_EMBEDDING, natural_photos

    xrays = sorted(handful.rglob("*.jpg"))  # the 40 committed real X-rays
    photos = [image for _, image in natural_photos()]
    eager = Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend="torch")
    onnx = Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend="onnx")
    assert eager.ood.embedding == DEFAULT_EMBEDDING  # the shipped detector is of the kind training fits now
    assert onnx.embedder.features is not None and eager.embedder.features is None
    for backend in (eager, onnx):
        xray_scores, photo_scores = backend.ood_scores(xrays), backend.ood_scores(photos)
        assert photo_scores.min() > backend.ood.threshold  # every picture flagged
        assert (xray_scores > backend.ood.threshold).sum() <= 1 and xray_scores.max() < photo_scores.min()
    np.testing.assert_allclose(onnx.ood_scores(xrays[:6]), eager.ood_scores(xrays[:6]), atol=1e-4)


def test_an_older_xray_check_file_still_loads_and_works(handful, tmp_path):
    """ood.safetensors written before the embedding was recorded: mirror-averaged ImageNet features."""
    from safetensors.torch import load_file, save_file

    from bonebreak.ood import LEGACY_EMBEDDING, OOD_FILE, ImageEmbedder, OODDetector, natural_photos

    folder = tmp_path / "old"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns("eval_*"))
    files = real_images(handful, 4)
    old = ImageEmbedder(embedding=LEGACY_EMBEDDING)
    detector = OODDetector.fit(old(files[:3]), old(files[3:]), k=2, embedding=LEGACY_EMBEDDING)
    detector.save(folder)
    tensors = load_file(str(folder / OOD_FILE))  # rewrite with the old metadata only
    save_file(tensors, str(folder / OOD_FILE), metadata={"threshold": repr(detector.threshold), "k": "2", "quantile": "0.99",
                                                          "features": "efficientnet_lite0 ImageNet, no crop, mirror-averaged"})
    predictor = Predictor.from_checkpoint(folder, device="cpu", backend="onnx")
    assert predictor.ood.embedding == LEGACY_EMBEDDING and predictor.embedder.embedding.mirror
    np.testing.assert_allclose(predictor.ood_scores(files), detector.scores(old(files)), atol=2e-3)
    assert predictor.analyse(natural_photos()[0][1], heatmap=False).prediction.not_xray
