"""The numbers every report prints: exact values on small hand-made cases, and the bootstrap intervals' behaviour.
Fast; written to kill the mutants mutmut found in bonebreak/evaluation/metrics.py."""

from __future__ import annotations

import numpy as np
import pytest

from bonebreak.evaluation.metrics import (bootstrap_intervals, classification_metrics, expected_calibration_error, headline,
                                          reliability_bins, top_k_accuracy)

NAMES = ["a", "b", "c", "d"]
LABELS = np.array([0, 1, 2, 3, 0, 1])
PROBS = np.array([[0.7, 0.1, 0.1, 0.1],   # right
                  [0.5, 0.3, 0.1, 0.1],   # wrong, true class 2nd
                  [0.4, 0.3, 0.2, 0.1],   # wrong, true class 3rd
                  [0.4, 0.3, 0.2, 0.1],   # wrong, true class 4th
                  [0.1, 0.6, 0.2, 0.1],   # wrong, true class 3rd
                  [0.2, 0.5, 0.2, 0.1]])  # right


def test_top_k_accuracy_counts_the_true_class_among_the_k_best():
    assert top_k_accuracy(LABELS, PROBS, 1) == pytest.approx(2 / 6)
    assert top_k_accuracy(LABELS, PROBS, 2) == pytest.approx(3 / 6)
    assert top_k_accuracy(LABELS, PROBS, 3) == pytest.approx(5 / 6)
    assert top_k_accuracy(LABELS, PROBS, 10) == 1.0  # k larger than the classes: every class counts


def test_classification_metrics_on_a_hand_made_case():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert m["n"] == 6 and m["labels"] == NAMES
    assert m["accuracy"] == pytest.approx(2 / 6) and m["top3_accuracy"] == pytest.approx(5 / 6)
    # predictions: a, a, a, a, b, b
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.25, "recall": 0.5, "f1": pytest.approx(1 / 3), "support": 2}
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["c"]["support"] == 1 and m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((1 / 3 + 0.5) / 4)
    assert m["weighted_f1"] == pytest.approx((2 * 1 / 3 + 2 * 0.5) / 6)
    assert m["macro_precision"] == pytest.approx(0.75 / 4) and m["macro_recall"] == pytest.approx(0.25)
    assert m["weighted_precision"] == pytest.approx((2 * 0.25 + 2 * 0.5) / 6) and m["weighted_recall"] == pytest.approx(2 / 6)


def test_classification_metrics_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="expected probs of shape"):
        classification_metrics(LABELS, PROBS[:, :3], NAMES)
    with pytest.raises(ValueError, match="expected probs of shape"):
        classification_metrics(LABELS[:5], PROBS, NAMES)


def test_headline_keeps_the_scalars_only():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert set(headline(m)) == {"accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
                                "weighted_f1", "top3_accuracy"}


def test_bootstrap_intervals_are_seeded_ordered_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    probs = rng.random((400, 4))
    probs[np.arange(400), labels] += 0.6  # about 3 in 4 right
    small = bootstrap_intervals(labels[:40], probs[:40], n_resamples=200)
    large = bootstrap_intervals(labels, probs, n_resamples=200)
    assert small == bootstrap_intervals(labels[:40], probs[:40], n_resamples=200)  # the seed fixes them
    assert small != bootstrap_intervals(labels[:40], probs[:40], n_resamples=200, seed=1)
    assert set(large) == set(headline(classification_metrics(labels, probs, NAMES)))
    point = classification_metrics(labels, probs, NAMES)
    for name, (low, high) in large.items():
        assert low <= point[name] <= high, name
        assert high - low < small[name][1] - small[name][0], name
    accuracy_width = large["accuracy"][1] - large["accuracy"][0]
    assert 0.05 < accuracy_width < 0.12  # about 2 x 1.96 x sqrt(p(1-p)/n) for p 0.75, n 400
    narrow = bootstrap_intervals(labels, probs, n_resamples=200, level=0.5)
    assert narrow["accuracy"][1] - narrow["accuracy"][0] < accuracy_width


def test_reliability_bins_and_calibration_error():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.65, 0.35], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0, 1])
    bins = reliability_bins(probs, labels, bins=10)
    assert [(round(s, 3), round(c, 3), round(a, 3)) for s, c, a in bins] == [(0.2, 0.55, 0.0), (0.4, 0.65, 1.0), (0.4, 0.95, 0.5)]
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.2 * 0.55 + 0.4 * 0.35 + 0.4 * 0.45)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_a_class_nobody_has_still_counts_in_the_macro_average():
    """A split may lack a class entirely (the model's label list is the reference): it scores 0 and counts."""
    labels, probs = np.array([0, 1]), np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["macro_precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    intervals = bootstrap_intervals(labels, probs, n_resamples=50)
    assert intervals["macro_f1"][1] <= 2 / 3 + 1e-9  # never above what a perfect two-class score gives over three classes


def test_a_class_never_predicted_has_precision_zero():
    assert classification_metrics(LABELS, PROBS, NAMES)["per_class"]["c"]["precision"] == 0.0
    wrong = bootstrap_intervals(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1]] * 4), n_resamples=50)
    assert wrong["macro_precision"][1] <= 0.5 + 1e-9  # class b is never predicted: its precision is 0, not 1


def test_bootstrap_is_the_percentile_interval_of_resampled_accuracy():
    rng_data = np.random.default_rng(3)
    labels = rng_data.integers(0, 3, 60)
    probs = rng_data.random((60, 3))
    rng = np.random.default_rng(0)
    correct = probs.argmax(axis=1) == labels
    accuracies = [correct[rng.integers(0, 60, 60)].mean() for _ in range(300)]
    expected = [np.percentile(accuracies, 2.5), np.percentile(accuracies, 97.5)]
    assert bootstrap_intervals(labels, probs, n_resamples=300)["accuracy"] == pytest.approx(expected)


def test_top_k_ranks_within_each_image():
    labels = np.array([2, 0])
    probs = np.array([[0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])  # ranking down the columns would give other answers
    assert top_k_accuracy(labels, probs, 1) == 0.5
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["top3_accuracy"] == 1.0
    assert bootstrap_intervals(np.array([2, 2]), np.array([[0.1, 0.2, 0.7], [0.3, 0.2, 0.5]]), n_resamples=20)["top3_accuracy"] == [1.0, 1.0]


def test_reliability_bin_edges():
    """Bins are (low, high]: 0.7 belongs to (0.6, 0.7], 1.0 to the last bin; ``bins`` sets their number."""
    probs = np.array([[0.7, 0.3], [1.0, 0.0], [0.55, 0.45]])
    labels = np.array([0, 0, 1])
    assert [round(c, 2) for _, c, _ in reliability_bins(probs, labels, bins=10)] == [0.55, 0.7, 1.0]
    assert [round(c, 3) for _, c, _ in reliability_bins(probs, labels, bins=2)] == [0.75]
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(2 / 3 - 0.75))
    assert reliability_bins(np.array([[0.5, 0.5]]), np.array([0]), bins=2) == [(1.0, 0.5, 1.0)]
