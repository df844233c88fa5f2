"""Re-evaluate a checkpoint and rewrite its metrics.json and model card (README.md): ``bonebreak model-card``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import parse
from ..common.checkpoint_format import SHIPPED_MODEL
from ..evaluation.card_refresh import refresh_card


@dataclass
class CardArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder (with its metrics.json)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."})
    cv_report: str | None = field(default=None, metadata={"help": "cv.json of `bonebreak train --cv_folds K` with the same recipe, to include."})
    reuse_reports: bool = field(
        default=False, metadata={"help": "Render from the eval_*/ reports already in the checkpoint instead of evaluating again."}
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse(CardArguments, argv, "bonebreak model-card", __doc__)
    card = refresh_card(Path(args.model_path), args.data_dir, args.reuse_reports, args.cv_report)
    print(f"wrote {card}")
    return card

