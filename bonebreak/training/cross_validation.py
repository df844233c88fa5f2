"""Grouped k-fold cross-validation of a training recipe over the Train folder (``--cv_folds``): one model per fold,
each scored on its held-out fold; ``cv.json`` (mean and spread) and every image's out-of-fold probabilities."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..common.checkpoint_format import METRICS_FILE
from ..data.loading import cv_fold_data
from ..evaluation.metrics import headline
from ..evaluation.reports import PROBABILITIES_FILE
from .arguments import BoneBreakTrainingArguments, DataArguments, ModelArguments, arguments_record
from .setup import set_up_run
from .trainer import edit_training, load_data, run_training

logger = logging.getLogger(__name__)


def fold_result(fold_dir: Path) -> dict[str, Any]:
    """The held-out fold's scores as users get them (the saved fp32 model, calibrated), from its report."""
    report = json.loads((fold_dir / "eval_validation" / "metrics.json").read_text())
    return {"n_validation": report["n"], **headline(report)}


def fold_spread(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over folds of every accuracy and F1 score (what CV tables print)."""
    keys = [k for k in per_fold[0] if k.endswith(("accuracy", "f1"))]
    return {"mean": {k: float(np.mean([f[k] for f in per_fold])) for k in keys},
            "std": {k: float(np.std([f[k] for f in per_fold], ddof=1)) for k in keys}}


def merge_out_of_fold(fold_dirs: list[Path], out: Path) -> Path:
    """Every held-out fold's ``probabilities.csv`` in one file: each Train image scored by the model that did not see it."""
    lines: list[str] = []
    for folder in fold_dirs:
        text = (folder / "eval_validation" / PROBABILITIES_FILE).read_text().splitlines()
        lines += text if not lines else text[1:]  # one header
    out.write_text("\n".join(lines) + "\n")
    return out


def run_cv(model_args: ModelArguments, data_args: DataArguments, args: BoneBreakTrainingArguments) -> dict:
    """Grouped k-fold cross-validation of the recipe over the Train folder.

    The folds (``--seed`` picks them) are drawn from all of Train before any training-set option applies, so two
    recipes with the same seed are scored on exactly the same held-out images with their original labels; the
    options (``--exclude_file`` & co.) thin or relabel each fold's training part only. Writes ``cv.json`` and
    ``oof_probabilities.csv`` (input of ``bonebreak label-issues``).
    """
    args = set_up_run(args, model_args.model)
    data = load_data(data_args, args.seed)
    per_fold, fold_dirs = [], []
    for fold, fold_data in enumerate(cv_fold_data(data, args.cv_folds, args.seed)):
        fold_args = replace(args, output_dir=str(Path(args.output_dir) / f"fold{fold}"), evaluate_test=False, cv_folds=0,
                            overwrite_output_dir=args.overwrite_output_dir or not args.resume)
        fold_data = edit_training(fold_data, data_args, args.seed)
        fold_dirs.append(Path(fold_args.output_dir))
        if args.resume and (fold_dirs[-1] / "eval_validation" / PROBABILITIES_FILE).is_file():  # finished before an interruption
            logger.info("--resume: fold %d was finished before, reusing %s", fold, fold_dirs[-1])
            summary = json.loads((fold_dirs[-1] / METRICS_FILE).read_text())
        else:
            summary = run_training(model_args, data_args, fold_args, fold_data)
        per_fold.append({"seed": args.seed, "fold": fold, "n_train": len(fold_data.splits["train"]),
                         "train_seconds": summary["train_seconds"], **fold_result(fold_dirs[-1])})
        shutil.rmtree(fold_args.work_dir, ignore_errors=True)  # resumable state is not needed once a fold is done
    recipe = arguments_record(model_args, data_args, args)
    result = {
        "folds": args.cv_folds,
        "seed": args.seed,
        "recipe": {k: v for k, v in recipe.items() if k not in ("output_dir", "cv_folds")},
        "per_fold": per_fold,
        **fold_spread(per_fold),
        "out_of_fold": str(merge_out_of_fold(fold_dirs, Path(args.output_dir) / "oof_probabilities.csv")),
    }
    (Path(args.output_dir) / "cv.json").write_text(json.dumps(result, indent=2))
    logger.info("grouped %d-fold CV: macro-F1 %.3f +- %.3f, accuracy %.3f +- %.3f", args.cv_folds, result["mean"]["macro_f1"],
                result["std"]["macro_f1"], result["mean"]["accuracy"], result["std"]["accuracy"])
    return result
