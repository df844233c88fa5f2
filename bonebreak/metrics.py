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
