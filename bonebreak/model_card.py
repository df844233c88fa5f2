"""Re-evaluate a checkpoint and rewrite its model card: ``python -m bonebreak.model_card``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import render
from .cli import parse
from .data import load_splits, resolve_data_dir
from .evaluation import evaluate_splits, record_results
from .inference import Predictor
from .models import SHIPPED_MODEL
from .splits import EVALUATION_SPLITS


def evaluate_checkpoint(folder: Path, summary: dict[str, Any], data_dir: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Evaluate on the splits the checkpoint was trained with, into its eval_<split>/ folders."""
    arguments = summary["arguments"]
    data = load_splits(resolve_data_dir(data_dir), val_fraction=arguments["val_fraction"], seed=arguments["seed"],
                       split_manifest=arguments.get("split_manifest", "none"))
    names = [str(name) for name in EVALUATION_SPLITS if name in data.splits]
    return evaluate_splits(Predictor.from_checkpoint(folder), data.splits, data.labels, names, lambda name: folder / f"eval_{name}")


@dataclass
class CardArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder (with its metrics.json)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."})
    cv_report: str | None = field(default=None, metadata={"help": "cv.json of `train.py --cv K` with the same recipe, to include."})
    reuse_reports: bool = field(
        default=False, metadata={"help": "Render from the eval_*/ reports already in the checkpoint instead of evaluating again."}
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse(CardArguments, argv)
    folder = Path(args.model_path)
    summary = json.loads((folder / "metrics.json").read_text())
    if args.reuse_reports:
        reports = {str(name): json.loads((folder / f"eval_{name}" / "metrics.json").read_text())
                   for name in EVALUATION_SPLITS if (folder / f"eval_{name}" / "metrics.json").is_file()}
        ood = None  # keep the recorded X-ray check
    else:
        reports, ood = evaluate_checkpoint(folder, summary, args.data_dir)
    record_results(summary, reports, ood)
    if (folder / "calibration.json").is_file():
        summary["calibration"] = json.loads((folder / "calibration.json").read_text())
    if args.cv_report:
        summary["cv"] = json.loads(Path(args.cv_report).read_text())
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2))
    card = folder / "README.md"
    card.write_text(render(summary, reports))
    print(f"wrote {card}")
    return card


if __name__ == "__main__":
    main()
