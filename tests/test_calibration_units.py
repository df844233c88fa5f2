"""Units of bonebreak.evaluation.calibration on tiny inputs: the temperature's bounds, folding it into a
head (with or without a bias, twice, or not at all), and what fit_calibration writes.

No network runs: fit_calibration takes the predictor and the X-ray check's embedder as arguments, so
these tests hand it fixed logits and fixed embeddings.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import PretrainedConfig

from bonebreak.common.checkpoint_format import CALIBRATION_FILE, FOLDED_KEY, TEMPERATURE_KEY, XRAY_CHECK_FILE, XRAY_CHECK_ONNX
from bonebreak.evaluation import calibration
from bonebreak.evaluation.calibration import calibrate_model, fit_calibration, fit_temperature, fold_temperature
from bonebreak.evaluation.metrics import expected_calibration_error
from bonebreak.models.factory import preprocess_config_of
from bonebreak.models.torch_backend import TorchForward
from bonebreak.serving.checkpoint_info import labels_of
from bonebreak.serving.predictor import Predictor, softmax
from bonebreak.serving.xray_check import LEGACY_FILE, QUANTILE, XrayCheck
from conftest import SHIPPED_MODEL, write_image

LABELS = np.arange(60) % 3


def test_logits_that_point_away_from_the_answer_get_the_largest_temperature():
    # The NLL keeps falling as T grows (towards uniform probabilities): the fit stops at the upper bound.
    assert fit_temperature(-5 * np.eye(3)[LABELS], LABELS) == 20.0


def test_always_right_logits_get_the_smallest_temperature():
    # The NLL keeps falling as T shrinks (towards certainty): the fit stops at the lower bound.
    assert fit_temperature(np.eye(3)[LABELS], LABELS) == 0.05


def tiny_model(head: torch.nn.Module, num_labels: int = 3) -> SimpleNamespace:
    """What fold_temperature touches: ``config`` and the final layer (``classifier``, as transformers names it)."""
    return SimpleNamespace(config=PretrainedConfig(num_labels=num_labels), classifier=head)


def test_folding_twice_multiplies_the_recorded_temperature_and_a_bias_free_head_works():
    torch.manual_seed(0)
    model = tiny_model(torch.nn.Linear(4, 3, bias=False))
    weight = model.classifier.weight.detach().clone()
    assert fold_temperature(model, 2.0) and fold_temperature(model, 1.5)
    torch.testing.assert_close(model.classifier.weight, weight / 3.0)
    # A re-calibrated model records the total it divided by, and leaves nothing for the Predictor to apply.
    assert getattr(model.config, FOLDED_KEY) == pytest.approx(3.0) and getattr(model.config, TEMPERATURE_KEY) == 1.0


@pytest.mark.parametrize("head", [torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.nn.Linear(4, 5)],
                         ids=["not-a-linear-layer", "not-the-logits"])
def test_a_head_that_cannot_be_folded_keeps_the_temperature_in_the_config(head, caplog):
    model = tiny_model(head)
    before = [p.detach().clone() for p in head.parameters()]
    with caplog.at_level(logging.WARNING, logger="bonebreak.evaluation.calibration"):
        assert fold_temperature(model, 2.0) is False
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), before))
    assert getattr(model.config, TEMPERATURE_KEY) == 2.0 and getattr(model.config, FOLDED_KEY, None) is None
    assert f"stays in config.{TEMPERATURE_KEY}" in caplog.text


def test_fit_calibration_writes_the_temperature_ece_and_xray_check_of_its_inputs(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images = [f"val/{i}.png" for i in range(300)]
    labels = rng.integers(0, 3, len(images))
    # Right about 2 times in 3 but 3x overconfident: the fitted temperature must soften the probabilities.
    logits = 3 * (rng.normal(0, 1, (len(images), 3)) + 1.5 * np.eye(3)[labels])
    raw = SimpleNamespace(logits=lambda paths: logits[[images.index(p) for p in paths]])
    centre = rng.normal(size=8)
    train_embeddings = centre + rng.normal(scale=0.1, size=(40, 8))  # validation lies further out than train
    val_embeddings = centre + rng.normal(scale=0.5, size=(len(images), 8))
    embedder = lambda paths: train_embeddings if paths[0].startswith("train") else val_embeddings
    train_images = [f"train/{i}.png" for i in range(40)]

    with caplog.at_level(logging.INFO, logger="bonebreak.evaluation.calibration"):
        result = fit_calibration(raw, train_images, images, list(labels), embedder, tmp_path)

    assert json.loads((tmp_path / CALIBRATION_FILE).read_text()) == result
    temperature = fit_temperature(logits, labels)
    assert result["temperature"] == temperature > 1.5
    assert result["validation_ece_before"] == expected_calibration_error(softmax(logits), labels)
    assert result["validation_ece_after"] == expected_calibration_error(softmax(logits, temperature), labels)
    assert result["validation_ece_after"] < result["validation_ece_before"]
    expected_check = XrayCheck.fit(train_embeddings, val_embeddings)  # references from train, threshold from validation
    assert result["xray_check_threshold"] == expected_check.threshold and result["xray_check_quantile"] == QUANTILE
    assert load_file(str(tmp_path / XRAY_CHECK_FILE))["train_embeddings"].shape == (40, 8)
    assert (tmp_path / "reliability_validation.png").stat().st_size > 0
    assert (f"temperature {result['temperature']:.3f}, validation ECE {result['validation_ece_before']:.3f} -> "
            f"{result['validation_ece_after']:.3f}") in caplog.text  # the line a training log shows


@pytest.mark.parametrize("head_kind", ["linear", "wrapped"])
def test_calibrated_predictor_gives_the_tempered_probabilities_whether_or_not_the_head_folds(head_kind, tiny_vit, tmp_path, monkeypatch):
    from transformers import ViTForImageClassification, ViTImageProcessor

    # Exporting the X-ray check's network needs ImageNet weights: use the shipped export of the same network.
    monkeypatch.setattr(calibration, "export_xray_check",
                        lambda folder: shutil.copy(SHIPPED_MODEL / XRAY_CHECK_ONNX, Path(folder) / XRAY_CHECK_ONNX))
    images = [str(write_image(tmp_path / "images" / f"{i}.png", seed=i)) for i in range(8)]
    model, processor = ViTForImageClassification.from_pretrained(tiny_vit).eval(), ViTImageProcessor.from_pretrained(tiny_vit)
    if head_kind == "wrapped":  # same logits, but no final nn.Linear to fold into: the Predictor applies T instead
        model.classifier = torch.nn.Sequential(model.classifier)
    raw_logits = Predictor(labels_of(model.config.to_dict()), preprocess_config_of(model, processor), TorchForward(model)).logits(images[5:])
    out = tmp_path / "out"
    out.mkdir()
    if head_kind == "linear":  # a re-calibrated checkpoint may still hold the file of an older release
        (out / LEGACY_FILE).write_bytes(b"the X-ray check file of an older release")

    predictor, result = calibrate_model(model, processor, images[:5], images[5:], [0, 1, 2], out)

    assert result["temperature_folded_into_head"] is (head_kind == "linear")
    assert json.loads((out / CALIBRATION_FILE).read_text()) == result  # the file holds the folding flag too
    # Applied exactly once, by the head or by the Predictor, never both.
    np.testing.assert_allclose(predictor.probabilities(images[5:]), softmax(raw_logits, result["temperature"]), atol=1e-5)
    assert predictor.temperature == (1.0 if head_kind == "linear" else result["temperature"])
    assert predictor.xray_check.threshold == result["xray_check_threshold"] and predictor.xray_check.embedder is not None
    assert predictor.grad_cam is not None  # the app's heat maps still work on the calibrated model
    assert not (out / LEGACY_FILE).exists() and (out / XRAY_CHECK_FILE).is_file()
