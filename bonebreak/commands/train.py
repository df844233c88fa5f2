"""Fine-tune a classifier on a data folder, calibrate, evaluate and package it: ``bonebreak train`` or
``accelerate launch train.py`` (one or many GPUs, or CPU processes). Every ``transformers.TrainingArguments``
flag works; ``--cv_folds K`` cross-validates the recipe instead of training one model."""

from __future__ import annotations

import logging
import os

from ..training.arguments import parse_arguments
from ..training.cross_validation import run_cv
from ..training.setup import machine_defaults
from ..training.trainer import run_training


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("LOCAL_RANK", "0")) == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    model_args, data_args, args = parse_arguments(argv, prog="bonebreak train", description=__doc__, defaults=machine_defaults())
    return run_cv(model_args, data_args, args) if args.cv_folds else run_training(model_args, data_args, args)
