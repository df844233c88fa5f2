"""Evaluate a checkpoint on a dataset split: ``python -m bonebreak.evaluate --split test``.

Writes metrics.json, per_class.csv, predictions.csv, confusion_matrix.json/.png to a
report folder and prints a table. (The Hub-hosted metric scripts of the ``evaluate``
library cannot be fetched offline, so the numbers come from scikit-learn in
``bonebreak.metrics``.)
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .models import SHIPPED_MODEL
from .cli import parse
from .data import SPLITS, load_splits, resolve_data_dir
from .inference import Predictor
from .metrics import TOP_K, bootstrap_intervals, classification_metrics, headline
from .plots import plot_confusion_matrix

logger = logging.getLogger(__name__)

LEAKAGE_NOTE = (
    "The published Train/Test split of this dataset leaks near-duplicates (re-encoded, flipped and "
    "annotated copies of Train images appear in Test), so a score on it overstates accuracy on new X-rays."
)


CLEAN_NOTE = (
    "clean_test holds the published Test images that have no near-duplicate in Train (see `python -m bonebreak.audit`); "
    "it is small, so read the confidence intervals."
)


@dataclass
class EvalArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to evaluate."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."}
    )
    split: str = field(
        default="auto",
        metadata={"help": "auto (default: clean_test when the split manifest defines it, else test), train, validation, test "
                  "(published, leaks near-duplicates), clean_test (Test images with no near-copy in Train) or all "
                  "(validation, test and clean_test side by side)."},
    )
    cv_report: str | None = field(
        default=None, metadata={"help": "With --split all: a cv.json from `train.py --cv 5` to show beside the splits."}
    )
    split_manifest: str = field(
        default="auto", metadata={"help": "Grouped split manifest (see train.py --help); needed for clean_test."}
    )
    report_dir: str | None = field(
        default=None, metadata={"help": "Where to write the report (default: reports/<checkpoint>-<split>)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    val_fraction: float = field(
        default=0.15, metadata={"help": "Must match training when --split validation is carved out of train."}
    )
    seed: int = field(default=42, metadata={"help": "Must match training when --split validation is carved out of train."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda if available)."})

    def __post_init__(self) -> None:
        if self.split not in SPLITS + ("all", "auto"):
            raise ValueError(f"--split must be auto, one of {', '.join(SPLITS)} or all, got '{self.split}'")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


def label_index_map(data_labels: list[str], model_labels: list[str]) -> list[int]:
    """For each dataset label index, the model's index of the same label."""
    missing = [label for label in data_labels if label not in model_labels]
    if missing:
        raise ValueError(f"the dataset has classes the model does not know: {missing}; model labels: {model_labels}")
    return [model_labels.index(label) for label in data_labels]


def image_paths(dataset: datasets.Dataset) -> list[str]:
    return [item["path"] for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def predict_dataset(predictor: Predictor, dataset: datasets.Dataset, batch_size: int = 32) -> np.ndarray:
    paths = image_paths(dataset)
    chunks = [
        predictor.probabilities(paths[start : start + batch_size], batch_size=batch_size)
        for start in tqdm(range(0, len(paths), batch_size), desc="Predicting", unit="batch")
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(predictor.labels)))


def evaluate_split(
    predictor: Predictor, dataset: datasets.Dataset, data_labels: list[str], batch_size: int = 32
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
        rows.append(f"| {SPLIT_TITLES.get(split, split)} | {report['n']} | " + " | ".join(cells) + " |")
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


def run_evaluation(
    predictor: Predictor, dataset: datasets.Dataset, data_labels: list[str], split: str, out_dir: str | Path, batch_size: int = 32
) -> dict[str, Any]:
    """Evaluate, write the report folder and return the metrics (with the leakage note on test)."""
    metrics, truth, probs = evaluate_split(predictor, dataset, data_labels, batch_size)
    metrics["split"] = split
    if split == "test":
        metrics["note"] = LEAKAGE_NOTE
    elif split == "clean_test":
        metrics["note"] = CLEAN_NOTE
    write_report(metrics, out_dir, f"Confusion matrix ({split}, n={metrics['n']})", image_paths(dataset), truth, probs)
    return metrics


def ood_check(predictor: Predictor, dataset: datasets.Dataset, out_dir: str | Path | None = None) -> dict[str, Any] | None:
    """How well the X-ray check separates this split's X-rays from photos that are not X-rays."""
    from .calibration import auroc, natural_photos

    if predictor.ood is None:
        return None
    photos = natural_photos()
    xray_scores = predictor.ood_scores(image_paths(dataset))
    photo_scores = predictor.ood_scores([image for _, image in photos])
    result = {
        "auroc_photos_vs_xrays": auroc(photo_scores, xray_scores),
        "xrays_flagged": float(np.mean(xray_scores > predictor.ood.threshold)),
        "photos_flagged": float(np.mean(photo_scores > predictor.ood.threshold)),
        "n_xrays": len(xray_scores),
        "n_photos": len(photo_scores),
        "photos_missed": [name for (name, _), score in zip(photos, photo_scores) if score <= predictor.ood.threshold],
        "threshold": predictor.ood.threshold,
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "ood.json").write_text(json.dumps(result, indent=2))
    return result


def default_split(splits: Any) -> str:
    """clean Test where the grouped split manifest defines it (the honest number), else the folder's test split."""
    for name in ("clean_test", "test", "validation"):
        if name in splits:
            return name
    raise ValueError("the data folder has no test or validation split to evaluate on")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(EvalArguments, argv)
    predictor = Predictor.from_checkpoint(args.model_path, device=args.device)
    data = load_splits(resolve_data_dir(args.data_dir), val_fraction=args.val_fraction, seed=args.seed, split_manifest=args.split_manifest)
    split = default_split(data.splits) if args.split == "auto" else args.split
    splits = [s for s in ("validation", "test", "clean_test") if s in data.splits] if split == "all" else [split]
    missing = [s for s in splits if s not in data.splits]
    if missing:
        raise ValueError(f"split '{missing[0]}' does not exist in this data folder; available: {list(data.splits)}")
    out_dir = Path(args.report_dir or Path("reports") / f"{Path(args.model_path).name}-{split}")
    reports = {}
    for name in splits:
        folder = out_dir / name if split == "all" else out_dir
        reports[name] = run_evaluation(predictor, data.splits[name], data.labels, name, folder, args.batch_size)
        print(format_table(reports[name], f"{args.model_path} on {name}") + "\n")
    if split == "all":
        cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
        table = comparison_table(reports, cv)
        (out_dir / "comparison.md").write_text(table + "\n")
        print(table + "\n")
    ood = ood_check(predictor, data.splits[splits[-1]], out_dir)
    if ood is not None:
        print(f"X-ray check: AUROC {ood['auroc_photos_vs_xrays']:.3f} (non-X-ray photos vs {splits[-1]} X-rays), "
              f"{ood['xrays_flagged']:.1%} of X-rays and {ood['photos_flagged']:.1%} of photos flagged")
    for name, report in reports.items():
        if "note" in report:
            print(f"Note ({name}): {report['note']}")
    print(f"\nReport written to {out_dir}")
    return reports[splits[0]] if len(splits) == 1 else reports

if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad flags, data or checkpoint: one clear line, no traceback
        sys.exit(f"error: {error}")
