"""Evaluate a checkpoint: ``python -m bonebreak.evaluate [--split auto|clean_test|test|validation|all]``.

Writes metrics.json, per_class.csv, predictions.csv, confusion_matrix.json/.png and the X-ray
check's ood.json to a report folder and prints a table (the work is ``bonebreak.evaluation``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import parse
from .data import load_splits, resolve_data_dir
from .evaluation import comparison_table, evaluate_splits, format_table, honest_split
from .inference import Predictor
from .models import SHIPPED_MODEL
from .splits import EVALUATION_SPLITS, SPLITS


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(EvalArguments, argv)
    predictor = Predictor.from_checkpoint(args.model_path, device=args.device)
    data = load_splits(resolve_data_dir(args.data_dir), val_fraction=args.val_fraction, seed=args.seed, split_manifest=args.split_manifest)
    split = honest_split(data.splits) if args.split == "auto" else args.split
    names = [str(s) for s in EVALUATION_SPLITS if s in data.splits] if split == "all" else [split]
    missing = [name for name in names if name not in data.splits]
    if missing:
        raise ValueError(f"split '{missing[0]}' does not exist in this data folder; available: {list(data.splits)}")
    out_dir = Path(args.report_dir or Path("reports") / f"{Path(args.model_path).name}-{split}")
    reports, ood = evaluate_splits(predictor, data.splits, data.labels, names,
                                   lambda name: out_dir / name if split == "all" else out_dir, args.batch_size)
    for name, report in reports.items():
        print(format_table(report, f"{args.model_path} on {name}") + "\n")
    if split == "all":
        cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
        table = comparison_table(reports, cv)
        (out_dir / "comparison.md").write_text(table + "\n")
        print(table + "\n")
    if ood is not None:
        (out_dir / "ood.json").write_text(json.dumps(ood, indent=2))
        print(f"X-ray check: AUROC {ood['auroc_photos_vs_xrays']:.3f} (non-X-ray photos vs {honest_split(data.splits)} X-rays), "
              f"{ood['xrays_flagged']:.1%} of X-rays and {ood['photos_flagged']:.1%} of photos flagged")
    for name, report in reports.items():
        if "note" in report:
            print(f"Note ({name}): {report['note']}")
    print(f"\nReport written to {out_dir}")
    return reports[names[0]] if len(names) == 1 else reports


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad flags, data or checkpoint: one clear line, no traceback
        sys.exit(f"error: {error}")
