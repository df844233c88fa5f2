"""ONNX export and the ONNX Runtime backend of the served classifier, the CLI and the app; the X-ray check's network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHIPPED_MODEL

from bonebreak.common.checkpoint_format import (CLASS_MAPS, EMBEDDING, LOGITS, ONNX_FILE, SIMILAR_CASES_FILE, WEIGHTS_HASH_KEY,
                                                XRAY_CHECK_FILE, XRAY_CHECK_ONNX)
from bonebreak.models.onnx_export import export_onnx
from bonebreak.models.torch_backend import TorchForward, load_classifier
from bonebreak.serving.loader import load_predictor
from bonebreak.serving.onnx_runtime import OnnxForward, load_classifier_onnx, weights_stamp

ON_CPU = partial(TorchForward.from_checkpoint, device="cpu")


def engine(folder: Path, backend: str, **kwargs):
    """The folder's own model on ``backend`` (PyTorch on the CPU where it is asked for or chosen)."""
    return load_predictor(folder, backend, ON_CPU, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A copy of the shipped checkpoint, freshly exported (not the committed model.onnx)."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns(ONNX_FILE, "eval_*"))
    report = export_onnx(folder)
    assert max(report["max_difference"]["probabilities"].values()) <= 1e-4
    assert report["outputs"] == [LOGITS, EMBEDDING, CLASS_MAPS]  # the heat map comes from the same forward pass
    assert max(report["max_difference"][CLASS_MAPS].values()) <= 1e-4
    assert max(report["max_difference"][EMBEDDING].values()) <= 1e-4
    return folder


def real_images(handful: Path, n: int = 12) -> list[Path]:
    """Real X-rays spread over the classes of the committed fixture (every third of its 40 files)."""
    files = sorted(handful.rglob("*.jpg"))[::3][:n]
    assert len(files) == n
    return files


def test_onnx_matches_pytorch_on_real_images_at_any_batch_size(exported, handful):
    files = real_images(handful)
    eager = engine(exported, "torch", calibrated=False, xray_check=False)
    onnx = engine(exported, "onnx", calibrated=False, xray_check=False)
    assert (type(eager.forward), type(onnx.forward)) == (TorchForward, OnnxForward)
    for batch_size in (1, 5):  # dynamic batch axis
        difference = np.abs(onnx.probabilities(files, batch_size) - eager.probabilities(files, batch_size)).max()
        assert difference <= 1e-4
    runner = load_classifier_onnx(exported)
    assert runner.metadata[WEIGHTS_HASH_KEY] == weights_stamp(exported)
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
    with pytest.raises(ValueError, match="different weights.*bonebreak export --model_path"):
        engine(stale, "onnx", calibrated=False)
    assert isinstance(engine(stale, "auto", calibrated=False).forward, TorchForward)

    (stale / ONNX_FILE).unlink()
    with pytest.raises(ValueError, match="model.onnx not found"):
        engine(stale, "onnx", calibrated=False)
    with pytest.raises(ValueError, match="--backend must be one of"):
        load_classifier(stale, backend="tensorrt")


def test_export_refuses_a_disagreeing_model_and_leaves_no_file(exported, tmp_path):
    with pytest.raises(ValueError, match="disagrees with PyTorch"):
        export_onnx(exported, tmp_path / "strict.onnx", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_tiny_vit_exports_too(tiny_vit, tmp_path):
    folder = tmp_path / "vit"
    shutil.copytree(tiny_vit, folder)
    assert export_onnx(folder)["outputs"] == [LOGITS, EMBEDDING]  # tokens, no pooled feature map: Grad-CAM stays on PyTorch
    runner = OnnxForward(folder / ONNX_FILE)
    outputs = runner(np.zeros((2, 3, 64, 64), np.float32))
    assert outputs[LOGITS].shape == (2, 3) and outputs[EMBEDDING].shape == (2, 32)
    with torch.inference_mode():
        expected = ON_CPU(folder)(np.zeros((2, 3, 64, 64), np.float32))[LOGITS]
    np.testing.assert_allclose(outputs[LOGITS], expected, atol=1e-4)


def test_export_cli_writes_a_current_onnx_copy_and_names_a_bad_folder(tmp_path):
    from bonebreak.serving.xray_check import LEGACY_FILE

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns(ONNX_FILE, XRAY_CHECK_ONNX, "eval_*"))
    os.replace(folder / XRAY_CHECK_FILE, folder / LEGACY_FILE)  # a checkpoint from before 0.6
    result = subprocess.run([sys.executable, "-m", "bonebreak", "export", "--model_path", str(folder)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(folder / ONNX_FILE) and report["outputs"] == [LOGITS, EMBEDDING, CLASS_MAPS]
    assert load_classifier_onnx(folder).metadata[WEIGHTS_HASH_KEY] == weights_stamp(folder)
    # the older X-ray check file is renamed, and the check's network written beside it
    assert report["renamed"] == f"{LEGACY_FILE} -> {XRAY_CHECK_FILE}" and report["xray_check"]["path"] == str(folder / XRAY_CHECK_ONNX)
    assert (folder / XRAY_CHECK_FILE).is_file() and (folder / XRAY_CHECK_ONNX).is_file() and not (folder / LEGACY_FILE).exists()
    assert engine(folder, "onnx").xray_check is not None
    missing = subprocess.run([sys.executable, "-m", "bonebreak", "export", "--model_path", str(tmp_path / "nothing")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and f"{tmp_path / 'nothing'} not found" in missing.stderr


def test_predict_cli_backends_agree(exported, handful, capsys):
    from bonebreak.commands.predict import main

    files = [str(p) for p in real_images(handful, 4)]
    outputs = {}
    for backend in ("torch", "onnx"):
        assert main(["--model_path", str(exported), "--backend", backend, "--format", "json", *files]) == 0
        outputs[backend] = capsys.readouterr().out
    torch_rows, onnx_rows = (json.loads(outputs[b]) for b in ("torch", "onnx"))
    for a, b in zip(torch_rows, onnx_rows):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert np.allclose([p["probability"] for p in a["predictions"]], [p["probability"] for p in b["predictions"]], atol=1e-4)


def test_training_writes_a_current_onnx_copy(trained_vit):
    assert load_classifier_onnx(trained_vit).metadata[WEIGHTS_HASH_KEY] == weights_stamp(trained_vit)
    assert isinstance(load_classifier(trained_vit, backend="auto", device="cpu").forward, OnnxForward)
    assert (trained_vit / XRAY_CHECK_ONNX).is_file()  # and its X-ray check's network: served without PyTorch


def test_own_data_gets_similar_cases_only_when_asked_and_then_the_app_shows_them(trained_vit, handful, tmp_path, caplog):
    """Training on a user's own folder writes no thumbnails of it unasked; `export --similar_cases` then builds the
    index from the checkpoint's own features (here a ViT's class token, on ONNX Runtime), the card says what it ships,
    and the request handler shows the cases."""
    from bonebreak.commands import run
    from bonebreak.serving.ui import OutputImages, RequestHandler

    assert not (trained_vit / SIMILAR_CASES_FILE).exists() and SIMILAR_CASES_FILE not in (trained_vit / "README.md").read_text()
    folder = tmp_path / "vit"
    shutil.copytree(trained_vit, folder)
    run("export", ["--model_path", str(folder), "--similar_cases", "--data_dir", str(handful)])
    predictor = load_predictor(folder, "onnx")
    index = predictor.similar_cases
    trained_on = json.loads((folder / "metrics.json").read_text())["counts"]["train"]
    assert index is not None and len(index.names) == sum(trained_on.values()) and index.labels == predictor.labels
    assert "bone-break-mini" in index.credit and "CC BY" not in index.credit  # not credited as the shipped dataset
    assert "`similar_cases.safetensors`" in (folder / "README.md").read_text()
    image = next(p for p in sorted(handful.rglob("*.jpg")) if p.name in index.names)
    _, _, _, cases = RequestHandler(predictor, outputs=OutputImages(folder=tmp_path / "out"))(str(image), False)
    assert len(cases) == 6 and cases[0][1].split(" · ")[0].endswith("similarity 1.00")  # a training image finds itself first
    assert index.nearest(predictor.embeddings([str(image)]))[0].name == image.name
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-1] + b" ")  # other weights
    with caplog.at_level("WARNING"):
        assert load_predictor(folder, "torch", ON_CPU).similar_cases is None  # the model answers, without stale cases
    assert "built from other weights" in caplog.text and "--similar_cases" in caplog.text


def test_a_run_whose_index_cannot_be_built_does_not_claim_one(tiny_vit, handful, tmp_path, monkeypatch):
    """--similar_cases on a network that gives no pooled features: the run still finishes, and its card and
    metrics.json do not list an index the folder lacks."""
    from bonebreak.commands import run
    from bonebreak.training import finalize

    def no_features(*args, **kwargs):
        raise ValueError("this model's network gives no pooled features")

    monkeypatch.setattr(finalize, "write_case_index", no_features)
    out = tmp_path / "run"
    run("train", ["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
                  "--num_workers", "0", "--similar_cases", "yes"])
    assert not (out / SIMILAR_CASES_FILE).exists()
    assert json.loads((out / "metrics.json").read_text())["similar_cases"] is False
    assert "similar_cases.safetensors" not in (out / "README.md").read_text()


def test_a_damaged_onnx_file_is_named_not_a_crash(exported, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    (damaged / ONNX_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="cannot be loaded"):
        engine(damaged, "onnx", calibrated=False)
    assert isinstance(engine(damaged, "auto", calibrated=False).forward, TorchForward)


def test_xray_check_separates_photos_from_xrays_alike_on_onnx_runtime_and_pytorch(handful):
    from safetensors import safe_open

    from bonebreak.data.decode import load_image
    from bonebreak.data.preprocess import preprocess_batch
    from bonebreak.evaluation.xray_check_quality import natural_photos
    from bonebreak.models.onnx_export import XrayCheckEmbedding
    from bonebreak.serving.xray_check import EMBEDDING_NAME

    xrays = sorted(handful.rglob("*.jpg"))  # the 40 committed real X-rays
    photos = [image for _, image in natural_photos()]
    eager, onnx = engine(SHIPPED_MODEL, "torch"), engine(SHIPPED_MODEL, "onnx")
    with safe_open(str(SHIPPED_MODEL / XRAY_CHECK_FILE), "np") as handle:
        assert handle.metadata()["embedding"] == EMBEDDING_NAME  # the shipped check is of the kind training fits now
    assert eager.shared_input and onnx.shared_input  # the classifier's input serves the check on either backend
    for backend in (eager, onnx):
        xray_distances, photo_distances = backend.xray_distances(xrays), backend.xray_distances(photos)
        threshold = backend.xray_check.threshold
        assert photo_distances.min() > threshold  # every picture flagged
        assert (xray_distances > threshold).sum() <= 1 and xray_distances.max() < photo_distances.min()
        # a request's shared input gives the distances the check's own preprocessing gives
        shared = [prediction.xray_distance for prediction in backend.predictions(xrays[:6] + photos[:2])]
        np.testing.assert_allclose(shared, backend.xray_distances(xrays[:6] + photos[:2]), atol=1e-4)
    np.testing.assert_allclose(onnx.xray_distances(xrays[:6]), eager.xray_distances(xrays[:6]), atol=1e-4)
    # xray_check.onnx computes what its PyTorch network does
    network = XrayCheckEmbedding().eval()
    assert network.preprocess == onnx.xray_check.embedder.preprocess
    with torch.inference_mode():
        embeddings = network(torch.from_numpy(preprocess_batch([load_image(x) for x in xrays[:6]], network.preprocess))).numpy()
    np.testing.assert_allclose(onnx.xray_check.distances(embeddings), onnx.xray_distances(xrays[:6]), atol=1e-4)
