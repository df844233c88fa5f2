"""Figures people look at: confusion matrices, training curves and the selection protocol's paired gains (PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers, CI and training runs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def plot_paired_gains(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Forest plot: per row (``label``, ``differences``, ``gain``, ``t_interval``, ``adopt``) every paired
    difference as a dot, the mean gain and its 95% interval as a bar; green only where the gain passes the protocol's rule."""
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(rows)))
    for y, row in enumerate(reversed(rows)):
        colour = "tab:green" if row["adopt"] else "tab:grey"
        low, high = row["t_interval"]
        if np.isfinite(low) and np.isfinite(high):
            ax.plot([low, high], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
        ax.plot([row["gain"]], [y], "D", color=colour, markersize=7)
        ax.scatter(row["differences"], np.full(len(row["differences"]), y + 0.22), s=12, color="black", alpha=0.6)
    ax.axvline(0.0, color="tab:red", linewidth=1)
    ax.set_yticks(range(len(rows)), [row["label"] for row in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.3)
    ax.set_xlabel("gain  (dots: one per seed and fold;  bar: mean and 95% t interval;  green: passes the rule)")
    fig.suptitle(title)  # over the whole figure: the long row labels push the axes right
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
