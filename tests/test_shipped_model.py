"""The checkpoint committed in the repo: loads everywhere users load it, and says what it measured."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import REPO, SHIPPED_MODEL

TYPES = ["Avulsion", "Comminuted", "Fracture Dislocation", "Greenstick", "Hairline", "Impacted", "Longitudinal", "Oblique", "Pathological", "Spiral"]


def test_shipped_checkpoint_is_small_and_safetensors_only():
    files = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "training_curves.png"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert total < 32 * 1024 * 1024  # 14 MB of safetensors, 14 MB of ONNX copy, reports and the X-ray check


def test_shipped_checkpoint_loads_with_pipeline_and_auto_classes():
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained(SHIPPED_MODEL)
    assert [model.config.id2label[i] for i in range(10)] == TYPES
    AutoImageProcessor.from_pretrained(SHIPPED_MODEL)
    classifier = pipeline("image-classification", model=str(SHIPPED_MODEL), top_k=3)
    result = classifier(Image.open(REPO / "examples" / "spiral_fracture.jpg").convert("RGB"))
    assert len(result) == 3 and all(r["label"] in TYPES for r in result)
    assert result[0]["score"] >= result[1]["score"] >= result[2]["score"]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pipeline_gives_the_calibrated_probabilities_of_the_app(backend):
    """The temperature is folded into the head: pipeline() users get what the app and CLI show."""
    from transformers import pipeline

    from bonebreak.inference import Predictor

    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert config["bonebreak_temperature"] == 1.0 and config["bonebreak_temperature_folded"] > 1.0
    predictor = Predictor.from_checkpoint(SHIPPED_MODEL, device="cpu", backend=backend)
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
