"""Classification metrics shared by training (model selection) and evaluation (reports)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

TOP_K = 3


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int = TOP_K) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean([label in row for label, row in zip(labels, top)]))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted P/R/F1, top-3, per-class report and confusion matrix."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(names) or len(labels) != len(probs):
        raise ValueError(f"expected probs of shape ({len(labels)}, {len(names)}), got {probs.shape}")
    preds = probs.argmax(axis=1)
    indices = list(range(len(names)))
    result: dict[str, Any] = {"n": int(len(labels)), "accuracy": float(np.mean(preds == labels))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=indices, average=average, zero_division=0)
        result.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    result[f"top{TOP_K}_accuracy"] = top_k_accuracy(labels, probs, TOP_K)
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=indices, zero_division=0)
    result["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, name in enumerate(names)
    }
    result["confusion_matrix"] = confusion_matrix(labels, preds, labels=indices).tolist()
    result["labels"] = list(names)
    return result


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only (what Trainer logs and tables print)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every headline metric (accuracy, P/R/F1, top-3).

    With 140 test images one image is 0.7 points, so a +-8 point interval is normal; the
    interval is what keeps a single number from overstating what was measured.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    rng = np.random.default_rng(seed)
    preds = probs.argmax(axis=1)
    classes = list(range(probs.shape[1]))
    k = min(TOP_K, probs.shape[1])
    in_top = (np.argsort(-probs, axis=1)[:, :k] == labels[:, None]).any(axis=1)
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        values = {"accuracy": float(np.mean(preds[idx] == labels[idx])), f"top{TOP_K}_accuracy": float(np.mean(in_top[idx]))}
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(labels[idx], preds[idx], labels=classes, average=average, zero_division=0)
            values.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
        for name, value in values.items():
            samples.setdefault(name, []).append(value)
    tail = (1.0 - level) / 2 * 100
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in samples.items()}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[tuple[float, float, float]]:
    """Per non-empty confidence bin (equal widths over 0..1, upper edge included): the share of images in it,
    their mean top probability and their accuracy."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    found = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            found.append((float(in_bin.mean()), float(confidence[in_bin].mean()), float(correct[in_bin].mean())))
    return found


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """The share-weighted gap between confidence and accuracy over the bins (Guo et al., 2017)."""
    return float(sum(share * abs(accuracy - confidence) for share, confidence, accuracy in reliability_bins(probs, labels, bins)))
