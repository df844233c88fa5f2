"""Evaluate a checkpoint: ``bonebreak evaluate [--split auto|clean_test|test|validation|all]``.

Writes metrics.json, per_class.csv, predictions.csv, confusion_matrix.json/.png and the X-ray
check's xray_check.json to a report folder and prints a table (the work is ``bonebreak.evaluation.reports``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.argument_parser import parse
from ..common.checkpoint_format import SHIPPED_MODEL
from ..data.layouts import resolve_data_dir
from ..data.loading import load_splits
from ..data.splits import EVALUATION_SPLITS, SPLITS
from ..evaluation.reports import comparison_table, evaluate_splits, format_table, honest_split
from ..serving.loader import BACKEND_HELP, check_backend
from ..models.serving_backend import load_served


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
        default=None, metadata={"help": "With --split all: a cv.json from `bonebreak train --cv_folds 5` to show beside the splits."}
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
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.split not in SPLITS + ("all", "auto"):
            raise ValueError(f"--split must be auto, one of {', '.join(SPLITS)} or all, got '{self.split}'")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(EvalArguments, argv, "bonebreak evaluate", __doc__)
    predictor = load_served(args.model_path, args.backend, args.device)
    data = load_splits(resolve_data_dir(args.data_dir), val_fraction=args.val_fraction, seed=args.seed, split_manifest=args.split_manifest)
    split = honest_split(data.splits) if args.split == "auto" else args.split
    names = [str(s) for s in EVALUATION_SPLITS if s in data.splits] if split == "all" else [split]
    missing = [name for name in names if name not in data.splits]
    if missing:
        raise ValueError(f"split '{missing[0]}' does not exist in this data folder; available: {list(data.splits)}")
    out_dir = Path(args.report_dir or Path("reports") / f"{Path(args.model_path).name}-{split}")
    reports, xray_check = evaluate_splits(predictor, data.splits, data.labels, names,
                                   lambda name: out_dir / name if split == "all" else out_dir, args.batch_size)
    for name, report in reports.items():
        print(format_table(report, f"{args.model_path} on {name}") + "\n")
    if split == "all":
        cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
        table = comparison_table(reports, cv)
        (out_dir / "comparison.md").write_text(table + "\n")
        print(table + "\n")
    if xray_check is not None:
        (out_dir / "xray_check.json").write_text(json.dumps(xray_check, indent=2))
        print(f"X-ray check: AUROC {xray_check['auroc_photos_vs_xrays']:.3f} (non-X-ray photos vs {honest_split(data.splits)} X-rays), "
              f"{xray_check['xrays_flagged']:.1%} of X-rays and {xray_check['photos_flagged']:.1%} of photos flagged")
    for name, report in reports.items():
        if "note" in report:
            print(f"Note ({name}): {report['note']}")
    print(f"\nReport written to {out_dir}")
    return reports[names[0]] if len(names) == 1 else reports

