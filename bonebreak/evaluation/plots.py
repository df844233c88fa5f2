"""Figures people look at: confusion matrices, training curves and reliability diagrams (PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers, CI and training runs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import expected_calibration_error, reliability_bins  # noqa: E402


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | os.PathLike, title: str) -> Path:
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    size = 1.0 + 0.75 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_training_curves(log_history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss and validation metrics per epoch from ``Trainer.state.log_history``."""
    # Entries after the "train_runtime" summary are the re-evaluation of the best model: not an epoch.
    end = next((i for i, e in enumerate(log_history) if "train_runtime" in e), len(log_history))
    history = log_history[:end]
    train = [(e["epoch"], e["loss"]) for e in history if "loss" in e and "epoch" in e]
    evals = [e for e in history if "eval_loss" in e]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", alpha=0.8)
    if evals:
        ax_loss.plot([e["epoch"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss")
        for key, name in (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1"), ("eval_top3_accuracy", "top-3")):
            if key in evals[0]:
                ax_metric.plot([e["epoch"] for e in evals], [e[key] for e in evals], "o-", label=f"validation {name}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylim(0, 1)
    ax_metric.set_title("validation metrics")
    ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)



def reliability_diagram(curves: dict[str, np.ndarray], labels: np.ndarray, path: str | os.PathLike, bins: int = 10) -> Path:
    """Accuracy against confidence per bin, one line per set of probabilities (e.g. before and after scaling)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    for name, probs in curves.items():
        _, confidence, accuracy = zip(*reliability_bins(probs, labels, bins)) if len(probs) else ((), (), ())
        ax.plot(confidence, accuracy, "o-", label=f"{name} (ECE {expected_calibration_error(probs, labels, bins):.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on validation")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
