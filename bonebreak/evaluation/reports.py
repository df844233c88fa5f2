"""Evaluate a model on dataset splits: metrics with 95% intervals, report folders, tables, and
the X-ray check's separation of photos from X-rays.

The one shared step "evaluate every split, run the X-ray check" (``evaluate_splits``) serves
training, ``bonebreak evaluate`` and ``bonebreak model-card`` alike. (The Hub-hosted metric
scripts of the ``evaluate`` library cannot be fetched offline, so the numbers come from
scikit-learn in ``metrics``.)
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..common.notices import CLEAN_TEST, LEAKAGE, UNAUDITED
from ..data.loading import image_paths, label_index_map
from ..data.splits import Split
from ..serving.loader import Classifier
from .metrics import TOP_K, bootstrap_intervals, classification_metrics, headline
from .plots import plot_confusion_matrix
from .xray_check_quality import natural_photos, xray_check_quality

logger = logging.getLogger(__name__)




def predict_dataset(predictor: Classifier, dataset: datasets.Dataset, batch_size: int = 32) -> np.ndarray:
    paths = image_paths(dataset)
    chunks = [
        predictor.probabilities(paths[start : start + batch_size], batch_size=batch_size)
        for start in tqdm(range(0, len(paths), batch_size), desc="Predicting", unit="batch")
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(predictor.labels)))


def evaluate_split(
    predictor: Classifier, dataset: datasets.Dataset, data_labels: list[str], batch_size: int = 32
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics in the model's label space, plus the true indices and probabilities."""
    truth = true_indices(dataset, data_labels, predictor.labels)
    probs = predict_dataset(predictor, dataset, batch_size)
    return metrics_with_intervals(truth, probs, predictor.labels), truth, probs


def true_indices(dataset: datasets.Dataset, data_labels: list[str], model_labels: list[str]) -> np.ndarray:
    mapping = label_index_map(data_labels, model_labels)
    return np.array([mapping[i] for i in dataset["label"]])


def metrics_with_intervals(truth: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    metrics = classification_metrics(truth, probs, labels)
    metrics["ci95"] = bootstrap_intervals(truth, probs)
    return metrics


PROBABILITIES_FILE = "probabilities.csv"  # every class's probability per image: out-of-fold inputs for label_issues


def write_probabilities(path: Path, paths: list[str], given: list[str], probs: np.ndarray, labels: list[str]) -> Path:
    """path, given label, then one column per class (the model's label order)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *labels])
        for image, label, row in zip(paths, given, probs):
            writer.writerow([image, label, *(f"{p:.6f}" for p in row)])
    return path


def read_probabilities(path: str | Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """paths, given labels, probabilities (n x classes) and the class names of a ``probabilities.csv``."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][:2] != ["path", "label"]:
        raise ValueError(f"{path}: not a probabilities file (expected a header 'path,label,<class>,...')")
    labels = rows[0][2:]
    body = rows[1:]
    probs = np.array([[float(v) for v in row[2:]] for row in body]).reshape(len(body), len(labels))
    return [row[0] for row in body], [row[1] for row in body], probs, labels


def write_report(
    metrics: dict[str, Any],
    out_dir: str | Path,
    title: str,
    paths: list[str] | None = None,
    truth: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = metrics["labels"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "confusion_matrix.json").write_text(
        json.dumps({"labels": labels, "rows_true_cols_predicted": metrics["confusion_matrix"]}, indent=2)
    )
    plot_confusion_matrix(metrics["confusion_matrix"], labels, out / "confusion_matrix.png", title)
    with open(out / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "precision", "recall", "f1", "support"])
        for label, row in metrics["per_class"].items():
            writer.writerow([label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", row["support"]])
    if paths is not None and truth is not None and probs is not None:
        with open(out / "predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "true", "predicted", "probability"] + [f"top{k + 1}" for k in range(TOP_K)])
            for path, true, row in zip(paths, truth, probs):
                order = np.argsort(-row)[:TOP_K]
                top = [f"{labels[i]} ({row[i]:.3f})" for i in order]
                writer.writerow([path, labels[true], labels[order[0]], f"{row[order[0]]:.4f}"] + top)
        write_probabilities(out / PROBABILITIES_FILE, paths, [labels[t] for t in truth], probs, labels)
    return out


SPLIT_TITLES = {
    "test": "published Test split (leaks near-duplicates of Train: optimistic)",
    "clean_test": "**clean Test** (published Test images with no near-copy in Train)",
    "validation": "validation (held out from Train)",
}


def _with_interval(value: float, interval: list[float] | None) -> str:
    return f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})" if interval else f"{value:.3f}"


def comparison_table(reports: dict[str, dict[str, Any]], cv: dict[str, Any] | None = None) -> str:
    """Markdown table, one row per split (95% bootstrap intervals), plus a CV row (mean +- std)."""
    columns = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("top3_accuracy", "top-3 accuracy")]
    rows = ["| split | n | " + " | ".join(title for _, title in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split, report in reports.items():
        ci = report.get("ci95", {})
        cells = [_with_interval(report[key], ci.get(key)) for key, _ in columns]
        title = SPLIT_TITLES.get(split, split)
        if split == Split.TEST and report.get("note") == UNAUDITED:
            title = "test split (not audited for near-duplicates of train)"
        rows.append(f"| {title} | {report['n']} | " + " | ".join(cells) + " |")
    if cv:
        cells = [f"{cv['mean'][key]:.3f} +- {cv['std'][key]:.3f}" for key, _ in columns]
        n = sum(f["n_validation"] for f in cv["per_fold"])
        rows.append(f"| grouped {cv['folds']}-fold CV over Train (mean +- std of folds) | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_table(metrics: dict[str, Any], title: str) -> str:
    lines = [title, "-" * len(title)]
    intervals = metrics.get("ci95", {})
    for name, value in headline(metrics).items():
        ci = f"  (95% CI {intervals[name][0]:.3f}-{intervals[name][1]:.3f})" if name in intervals else ""
        lines.append(f"{name:<20} {value:.4f}{ci}")
    lines.append(f"{'images':<20} {metrics['n']}")
    lines.append("")
    lines.append(f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for label, row in metrics["per_class"].items():
        lines.append(f"{label:<22}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}{row['support']:>9}")
    return "\n".join(lines)


def split_note(name: str, splits: Any) -> str | None:
    """What a reader must know about a split's score: the published Test split of the bone-break
    dataset leaks (known because the shipped audit manifest matched: clean_test exists); another
    folder's test split was never audited, so nothing is claimed either way."""
    if name == Split.CLEAN_TEST:
        return CLEAN_TEST
    if name == Split.TEST:
        return LEAKAGE if Split.CLEAN_TEST in splits else UNAUDITED
    return None


def run_evaluation(
    predictor: Classifier, dataset: datasets.Dataset, data_labels: list[str], split: str, out_dir: str | Path, batch_size: int = 32,
    note: str | None = None,
) -> dict[str, Any]:
    """Evaluate, write the report folder and return the metrics (with ``note``, see ``split_note``)."""
    metrics, truth, probs = evaluate_split(predictor, dataset, data_labels, batch_size)
    metrics["split"] = split
    if note:
        metrics["note"] = note
    write_report(metrics, out_dir, f"Confusion matrix ({split}, n={metrics['n']})", image_paths(dataset), truth, probs)
    return metrics


def xray_check_report(predictor: Classifier, dataset: datasets.Dataset) -> dict[str, Any] | None:
    """How well the X-ray check separates this split's X-rays from photos that are not X-rays."""
    if predictor.xray_check is None:
        return None
    photos = natural_photos()
    return xray_check_quality(predictor.xray_distances(image_paths(dataset)), predictor.xray_distances([image for _, image in photos]),
                              [name for name, _ in photos], predictor.xray_check.threshold)


def honest_split(splits: Any) -> str:
    """The split whose score overstates least: clean Test where the grouped split manifest
    defines it, else the folder's test split, else validation. Evaluation defaults to it and
    the X-ray check is always measured on it."""
    for name in (Split.CLEAN_TEST, Split.TEST, Split.VALIDATION):
        if name in splits:
            return str(name)
    raise ValueError("the data folder has no test or validation split to evaluate on")


def evaluate_splits(
    predictor: Classifier, splits: Any, labels: list[str], names: list[str], folder_of: Callable[[str], Path], batch_size: int = 32
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The step shared by training, the evaluate CLI and the model card: a report folder per
    split (``folder_of(name)``), then the X-ray check on the honest split."""
    reports = {name: run_evaluation(predictor, splits[name], labels, name, folder_of(name), batch_size, split_note(name, splits))
               for name in names}
    return reports, xray_check_report(predictor, splits[honest_split(splits)])


def record_results(summary: dict[str, Any], reports: dict[str, dict[str, Any]], xray_check: dict[str, Any] | None) -> dict[str, Any]:
    """Copy the test-split headlines (with intervals and notes) and the X-ray check into a run summary."""
    for name in (Split.TEST, Split.CLEAN_TEST):
        if name in reports:
            report = reports[name]
            summary[str(name)] = {**headline(report), "ci95": report["ci95"], **({"note": report["note"]} if "note" in report else {})}
    if xray_check is not None:
        summary["xray_check"] = xray_check
    return summary
