"""Temperature scaling, ECE (bonebreak.calibration) and the out-of-distribution check (bonebreak.ood)."""

from __future__ import annotations

import numpy as np
import pytest

from bonebreak.calibration import expected_calibration_error, fit_temperature, softmax
from bonebreak.ood import DEFAULT_EMBEDDING, OOD_FILE, OODDetector, auroc, natural_photos


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


def test_ood_detector_threshold_auroc_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)
    inliers = lambda n: centre + rng.normal(scale=0.3, size=(n, 64))
    detector = OODDetector.fit(inliers(300), inliers(200), k=3)
    outliers = rng.normal(size=(50, 64))
    fresh = inliers(500)
    assert (detector.scores(outliers) > detector.threshold).mean() > 0.95
    assert (detector.scores(fresh) > detector.threshold).mean() < 0.05  # the threshold is the validation 99th percentile
    assert auroc(detector.scores(outliers), detector.scores(fresh)) > 0.99
    detector.save(tmp_path)
    loaded = OODDetector.load(tmp_path)
    assert loaded.threshold == detector.threshold and loaded.embedding == DEFAULT_EMBEDDING
    np.testing.assert_allclose(loaded.scores(outliers), detector.scores(outliers), atol=2e-3)
    assert OODDetector.load(tmp_path / "nothing") is None


def test_natural_photo_set_ships_offline():
    photos = natural_photos()
    assert len(photos) >= 15 and all(np.asarray(image).ndim in (2, 3) for _, image in photos)


def test_an_xray_check_file_of_an_unknown_embedding_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    OODDetector.fit(np.eye(4) + 0.1, np.eye(4) + 0.2, k=2).save(tmp_path)
    save_file(load_file(str(tmp_path / OOD_FILE)), str(tmp_path / OOD_FILE), metadata={"threshold": "0.1", "embedding": "future_kind"})
    with pytest.raises(ValueError, match="future_kind"):
        OODDetector.load(tmp_path)
