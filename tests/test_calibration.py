"""Temperature scaling, ECE (bonebreak.evaluation.calibration, .metrics) and the X-ray check (bonebreak.serving.xray_check)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bonebreak.common.checkpoint_format import XRAY_CHECK_FILE, XRAY_CHECK_ONNX, ModelLoadError
from bonebreak.evaluation.calibration import fit_temperature
from bonebreak.evaluation.metrics import expected_calibration_error
from bonebreak.evaluation.xray_check_quality import auroc, natural_photos
from bonebreak.serving.predictor import softmax
from bonebreak.serving.xray_check import EMBEDDING_NAME, XrayCheck
from conftest import SHIPPED_MODEL


def with_xray_check_network(folder):
    """A folder holding the X-ray check's network (xray_check.onnx, copied from the shipped checkpoint), which
    XrayCheck.load needs beside the reference embeddings."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED_MODEL / XRAY_CHECK_ONNX, folder / XRAY_CHECK_ONNX)
    return folder


def overconfident_logits(n: int = 4000, classes: int = 5, true_t: float = 2.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])  # calibrated at T=1 by construction
    return logits * true_t, labels  # a model that is overconfident by a factor of true_t


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    logits, labels = overconfident_logits()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert after < before / 2 and after < 0.03


def test_ece_of_a_perfectly_calibrated_case_is_small():
    logits, labels = overconfident_logits(true_t=1.0, seed=1)
    assert expected_calibration_error(softmax(logits), labels) < 0.03


def test_xray_check_threshold_auroc_and_round_trip(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)
    inliers = lambda n: centre + rng.normal(scale=0.3, size=(n, 64))
    check = XrayCheck.fit(inliers(300), inliers(200), k=3)
    outliers = rng.normal(size=(50, 64))
    fresh = inliers(500)
    assert (check.distances(outliers) > check.threshold).mean() > 0.95
    assert (check.distances(fresh) > check.threshold).mean() < 0.05  # the threshold is the validation 99th percentile
    assert auroc(check.distances(outliers), check.distances(fresh)) > 0.99
    assert not check.passes(float(check.distances(outliers).max())) and check.passes(check.threshold)
    folder = with_xray_check_network(tmp_path / "ckpt")
    check.save(folder)
    loaded = XrayCheck.load(folder)
    with safe_open(str(folder / XRAY_CHECK_FILE), "np") as handle:
        assert handle.metadata()["embedding"] == EMBEDDING_NAME
    assert loaded.threshold == check.threshold and loaded.k == 3 and loaded.embedder is not None
    np.testing.assert_allclose(loaded.distances(outliers), check.distances(outliers), atol=2e-3)
    assert XrayCheck.load(tmp_path / "nothing") is None


def test_natural_photo_set_ships_offline():
    photos = natural_photos()
    assert len(photos) >= 15 and all(np.asarray(image).ndim in (2, 3) for _, image in photos)


def test_an_xray_check_file_of_an_unknown_embedding_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = with_xray_check_network(tmp_path / "ckpt")
    XrayCheck.fit(np.eye(4) + 0.1, np.eye(4) + 0.2, k=2).save(folder)
    path = str(folder / XRAY_CHECK_FILE)
    save_file(load_file(path), path, metadata={"threshold": "0.1", "embedding": "future_kind"})
    with pytest.raises(ModelLoadError, match="future_kind"):
        XrayCheck.load(folder)


def test_folding_the_temperature_divides_the_heads_bias_too():
    """softmax(W x / T + b / T): a head with a non-zero bias must have it divided as well, or the folded model's
    probabilities are not the calibrated ones."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from bonebreak.evaluation.calibration import fold_temperature
    from bonebreak.models.factory import classifier_head

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    model = ViTForImageClassification(config).eval()
    head = classifier_head(model)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([1.5, -2.0, 0.75]))  # a freshly built head's bias is zero: make it count
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
        assert fold_temperature(model, 2.0)
        after = model(pixel_values=pixels).logits
    torch.testing.assert_close(after, before / 2.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.bias, torch.tensor([0.75, -1.0, 0.375]))
    assert model.config.bonebreak_temperature == 1.0 and model.config.bonebreak_temperature_folded == 2.0
