"""``bonebreak add-member --model_path DIR --member RUN``: make a checkpoint an ensemble.

A thin front door: ``bonebreak.models.members.add_ensemble_member`` copies the member's serving files
(weights, config, ONNX copy, calibration, its own card) into ``DIR/members/NAME`` and lists it in
``DIR/ensemble.json``; ``bonebreak.evaluation.card_refresh.refresh_card`` then evaluates the ensemble on the
splits the checkpoint was trained with and rewrites its metrics.json and model card. The app, the
predict CLI and evaluation serve the mean of the members' calibrated probabilities from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import parse
from ..common.checkpoint_format import METRICS_FILE, SHIPPED_MODEL, ModelLoadError
from ..evaluation.card_refresh import refresh_card
from ..models.members import add_ensemble_member


@dataclass
class AddMemberArguments:
    member: str = field(metadata={"help": "Checkpoint folder to add (a finished `train.py` run with the same labels)."})
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder that becomes (or already is) the ensemble."})
    name: str | None = field(default=None, metadata={"help": "Folder name under MODEL_PATH/members/ (default: the member's model name)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder for the re-evaluation (default: $BONEBREAK_DATA, else data/bone-break)."})
    evaluate: bool = field(default=True, metadata={"help": "Re-evaluate the ensemble and rewrite the model card (--no_evaluate: only add)."})


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(AddMemberArguments, argv, "bonebreak add-member", __doc__)
    if args.evaluate and not (Path(args.model_path) / METRICS_FILE).is_file():
        raise ModelLoadError(f"{args.model_path} has no metrics.json (not a `train.py` run), so there are no splits to re-evaluate "
                             "the ensemble on: pass --no_evaluate to only add the member")
    target = add_ensemble_member(args.model_path, args.member, args.name)
    print(f"added {args.member} as {target}")
    if args.evaluate:
        print(f"wrote {refresh_card(Path(args.model_path), args.data_dir)}")
    return target

