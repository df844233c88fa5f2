"""The checkpoint committed in the repo: loads everywhere users load it, and says what it measured."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHIPPED_MODEL

TYPES = ["Avulsion", "Comminuted", "Fracture Dislocation", "Greenstick", "Hairline", "Impacted", "Longitudinal", "Oblique", "Pathological", "Spiral"]


def test_shipped_checkpoint_is_small_and_safetensors_only():
    files = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "model.onnx", "metrics.json", "training_curves.png",
            "xray_check.safetensors", "xray_check.onnx"} <= files
    assert "ood.safetensors" not in files  # the X-ray check's file before 0.6
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    # 14 MB of safetensors, 14 MB of ONNX copy, 14 MB of the X-ray check's network (xray_check.onnx), its 2 MB of
    # reference embeddings and the reports
    assert total < 48 * 1024 * 1024


def test_shipped_checkpoint_loads_with_pipeline_and_auto_classes():
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained(SHIPPED_MODEL)
    assert [model.config.id2label[i] for i in range(10)] == TYPES
    AutoImageProcessor.from_pretrained(SHIPPED_MODEL)
    classifier = pipeline("image-classification", model=str(SHIPPED_MODEL), top_k=3)
    result = classifier(Image.open(REPO / "examples" / "spiral_fracture.jpg").convert("RGB"))
    assert len(result) == 3 and all(r["label"] in TYPES for r in result)
    assert result[0]["score"] >= result[1]["score"] >= result[2]["score"]


def backend_name(predictor) -> str:
    from bonebreak.models.torch_backend import TorchForward
    from bonebreak.serving.onnx_runtime import OnnxForward

    return {TorchForward: "torch", OnnxForward: "onnx"}[type(predictor.forward)]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pipeline_gives_the_calibrated_probabilities_of_the_app(backend):
    """The temperature is folded into the head: pipeline() users get what the app and CLI show."""
    from transformers import pipeline

    from bonebreak.models.torch_backend import load_classifier

    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert config["bonebreak_temperature"] == 1.0 and config["bonebreak_temperature_folded"] > 1.0
    predictor = load_classifier(SHIPPED_MODEL, backend=backend, device="cpu")
    assert predictor.temperature == 1.0 and backend_name(predictor) == backend
    classifier = pipeline("image-classification", model=str(SHIPPED_MODEL), top_k=10)
    for example in sorted((REPO / "examples").glob("*.jpg")):
        image = Image.open(example).convert("RGB")
        ours = predictor.predict(image).probabilities
        theirs = {row["label"]: row["score"] for row in classifier(image)}
        assert ours.keys() == theirs.keys()
        assert max(abs(ours[label] - theirs[label]) for label in ours) <= 1e-5, example.name


def test_model_card_states_clean_test_and_cross_validation():
    card = (SHIPPED_MODEL / "README.md").read_text()
    metrics = json.loads((SHIPPED_MODEL / "metrics.json").read_text())
    assert metrics["grouped_splits"] and sum(metrics["counts"]["clean_test"].values()) == 108
    clean = metrics["clean_test"]
    assert f"| **clean Test** (published Test images with no near-copy in Train) | 108 | {clean['accuracy']:.3f}" in card
    assert "Grouped stratified 5-fold cross-validation" in card and "not a diagnostic device" in card
    assert "32 of the 140 published Test images have a near-copy in Train" in card


def test_shipped_metrics_are_recorded_with_the_leakage_note():
    metrics = json.loads((SHIPPED_MODEL / "metrics.json").read_text())
    assert metrics["labels"] == TYPES and metrics["model"] == "efficientnet_lite0"
    assert sum(metrics["counts"]["test"].values()) == 140
    assert "leaks near-duplicates" in metrics["test"]["note"]
    report = json.loads((SHIPPED_MODEL / "eval_test" / "metrics.json").read_text())
    assert report["n"] == 140 and report["accuracy"] == metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] > 0.2  # far above the 10% of chance, whatever leakage adds


def test_shipped_onnx_is_current_so_auto_serves_it():
    # A retrained checkpoint without a re-export would silently lose the ONNX speed-up.
    from bonebreak.common.checkpoint_format import WEIGHTS_HASH_KEY
    from bonebreak.models.torch_backend import load_classifier
    from bonebreak.serving.onnx_runtime import OnnxForward, load_classifier_onnx, weights_stamp

    assert load_classifier_onnx(SHIPPED_MODEL).metadata[WEIGHTS_HASH_KEY] == weights_stamp(SHIPPED_MODEL)
    assert isinstance(load_classifier(SHIPPED_MODEL, backend="auto", device="cpu").forward, OnnxForward)


def test_an_xray_check_file_from_before_0_6_is_adopted_or_refused_with_the_fix(handful, tmp_path):
    """ood.safetensors (the name before 0.6) of the current embedding is renamed and works; one fitted on an embedding
    serving no longer has is refused with the command that refits it."""
    from safetensors.numpy import load_file, save_file

    from bonebreak.common.checkpoint_format import XRAY_CHECK_FILE, ModelLoadError
    from bonebreak.evaluation.xray_check_quality import natural_photos
    from bonebreak.serving.loader import load_predictor
    from bonebreak.serving.xray_check import LEGACY_FILE, XrayCheck, adopt_legacy_file

    folder = tmp_path / "old"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns("eval_*"))
    os.replace(folder / XRAY_CHECK_FILE, folder / LEGACY_FILE)
    with pytest.raises(ModelLoadError, match=f"older {LEGACY_FILE}: run `bonebreak export --model_path"):
        load_predictor(folder, "onnx")
    assert adopt_legacy_file(folder) and not (folder / LEGACY_FILE).exists()
    assert not adopt_legacy_file(folder)  # nothing left to adopt
    files = sorted(handful.rglob("*.jpg"))[::10]  # real X-rays of four classes
    predictor, shipped = load_predictor(folder, "onnx"), load_predictor(SHIPPED_MODEL, "onnx")
    assert predictor.xray_check.threshold == shipped.xray_check.threshold
    np.testing.assert_allclose(predictor.xray_distances(files), shipped.xray_distances(files), atol=1e-6)
    assert predictor.analyse(natural_photos()[0][1], heatmap=False).prediction.xray_check_passed is False

    older = tmp_path / "older"
    shutil.copytree(folder, older)
    tensors = load_file(str(older / XRAY_CHECK_FILE))  # as written before the embedding was recorded
    save_file(tensors, str(older / LEGACY_FILE), metadata={"threshold": "0.3", "k": "2", "quantile": "0.99",
                                                           "features": "efficientnet_lite0 ImageNet, no crop, mirror-averaged"})
    (older / XRAY_CHECK_FILE).unlink()
    with pytest.raises(ModelLoadError, match="refit the X-ray check with `bonebreak calibrate --model_path"):
        adopt_legacy_file(older)
    assert (older / LEGACY_FILE).is_file() and not (older / XRAY_CHECK_FILE).exists()  # left as it was
    os.replace(older / LEGACY_FILE, older / XRAY_CHECK_FILE)  # renamed by hand: still refused, not misread
    with pytest.raises(ModelLoadError, match="was fitted on the embedding None"):
        XrayCheck.load(older)
