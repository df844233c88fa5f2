"""Fine-tune a fracture classifier with the Hugging Face ``Trainer``: set it up, run it, cross-validate.

``python train.py`` and ``accelerate launch train.py`` (one or many GPUs, several nodes, or
two CPU processes over gloo) run the same code: Accelerate decides the device and the
process group. The settings are in ``arguments.py`` (every ``TrainingArguments`` flag works),
the optional recipe pieces in ``recipe_extras.py``, and what happens after training (calibration,
reports, model card, saving) in ``packaging.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import upload_folder
from transformers import EarlyStoppingCallback, Trainer
from transformers.trainer_utils import set_seed

from .arguments import (
    Arguments,
    BoneBreakTrainingArguments,
    DataArguments,
    ModelArguments,
    arguments_record,
    parse_arguments,
    with_output_dir,
)
from .data import DecodedImages, LoadedData, cv_fold_data, load_splits, resolve_data_dir
from .evaluation import PROBABILITIES_FILE
from .metrics import classification_metrics, headline
from .models import create_model
from .packaging import final_message, package_model
from .recipe_extras import (
    WeightAverage,
    balanced_sampler,
    batch_mixer,
    class_weights,
    distillation_targets,
    layer_decay_groups,
    make_loss,
    mix_batch,
)
from .training_set import edit_training_split
from .transforms import EQUALIZE_KEY, AugmentConfig, collate, eval_transform, preprocess_config_from_processor, train_transform

logger = logging.getLogger(__name__)

RESUME_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def load_data(data: DataArguments, seed: int) -> LoadedData:
    """Every split of ``--data_dir`` as found, before the options that thin or fix the training images."""
    return load_splits(resolve_data_dir(data.data_dir), val_fraction=data.val_fraction, seed=seed, split_manifest=data.split_manifest)


def edit_training(data: LoadedData, options: DataArguments, seed: int) -> LoadedData:
    """``--dedup_groups``, ``--exclude_file``, ``--relabel_file``, ``--max_train_samples``: the train split only."""
    edited, _ = edit_training_split(data, seed=seed, dedup_groups=options.dedup_groups, exclude_file=options.exclude_file,
                                    relabel_file=options.relabel_file, max_train_samples=options.max_train_samples)
    return edited


def prepare_data(data: DataArguments, seed: int) -> LoadedData:
    """The splits a run trains and evaluates on, as this run's data arguments ask for them."""
    return edit_training(load_data(data, seed), data, seed)


def make_compute_metrics(labels: list[str]):
    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = torch.tensor(eval_prediction.predictions)
        probs = torch.softmax(logits.float(), dim=-1).numpy()
        return headline(classification_metrics(eval_prediction.label_ids, probs, labels))

    return compute_metrics


def trainer_arguments(args: BoneBreakTrainingArguments) -> BoneBreakTrainingArguments:
    """The same arguments with the Trainer writing its resumable checkpoints to ``<output_dir>.trainer/``."""
    return replace(args, output_dir=str(args.work_dir))


def last_complete_checkpoint(work_dir: Path) -> str | None:
    """Newest ``checkpoint-N`` that was written to the end (a kill while saving leaves a partial one).

    Trainer writes ``trainer_state.json`` last, so its presence marks a finished save.
    """
    candidates = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for folder in reversed(candidates):
        missing = [name for name in RESUME_FILES if not (folder / name).is_file()]
        if not missing:
            return str(folder)
        logger.warning("skipping incomplete checkpoint %s (missing %s)", folder, ", ".join(missing))
    return None


def resume_point(args: BoneBreakTrainingArguments) -> str | None:
    """The checkpoint to resume from, refusing to silently clobber an earlier run."""
    last = last_complete_checkpoint(args.work_dir) if args.work_dir.is_dir() else None
    if args.resume:
        if last is None:
            logger.warning("--resume given but %s holds no checkpoint: starting from scratch", args.work_dir)
        return last
    if last is not None and not args.overwrite_output_dir:
        raise ValueError(
            f"{args.work_dir} holds checkpoints of an earlier run ({Path(last).name}): "
            "pass --resume to continue it or --overwrite_output_dir to start over"
        )
    if args.overwrite_output_dir and args.work_dir.is_dir():
        shutil.rmtree(args.work_dir)
    return None


class BoneBreakTrainer(Trainer):
    """Trainer plus batch mixing, layer-wise learning-rate decay and class-balanced sampling (all off by default)."""

    def __init__(self, *args: Any, mixer: Any = None, layer_decay: float = 1.0, balanced_labels: list[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # balanced_labels: the training images' classes, given when sampling is to be class-balanced
        self.mixer, self.layer_decay, self.balanced_labels = mixer, layer_decay, balanced_labels

    def _get_train_sampler(self, train_dataset=None):
        if self.balanced_labels is None:
            return super()._get_train_sampler(train_dataset)
        return balanced_sampler(self.balanced_labels, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mixer is not None and model.training:
            inputs = mix_batch(self.mixer, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.layer_decay >= 1.0 or self.optimizer is not None:
            return super().create_optimizer(model)
        groups = layer_decay_groups(model or self.model, self.args.learning_rate, self.args.weight_decay, self.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                           eps=self.args.adam_epsilon)
        return self.optimizer


def model_inputs(split: datasets.Dataset, transform: Any, cache: bool, targets: np.ndarray | None = None) -> DecodedImages:
    """The split as Trainer inputs, decoded once into memory or on every read (``targets``: soft labels)."""
    return DecodedImages(split, transform, targets, cache=cache)


def build_trainer(model_args: ModelArguments, data_args: DataArguments, args: BoneBreakTrainingArguments, data: LoadedData,
                  model: Any, processor: Any) -> Trainer:
    model.config.update({EQUALIZE_KEY: model_args.equalize})  # saved with the weights, so inference equalises too
    preprocess = preprocess_config_from_processor(processor, model.config)
    targets = None
    if args.distill_from:
        targets = distillation_targets(data.splits["train"], data.labels, args.distill_from, args.distill_weight)
    train = model_inputs(data.splits["train"], train_transform(preprocess, AugmentConfig(policy=args.augment)), data_args.cache_images, targets)
    validation = model_inputs(data.splits["validation"], eval_transform(preprocess), data_args.cache_images)
    train_labels = list(data.splits["train"]["label"])
    weights = class_weights(train_labels, len(data.labels)) if args.class_weighted_loss else None
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    if args.ema:
        callbacks.append(WeightAverage(args.ema))
    return BoneBreakTrainer(
        model=model,
        args=trainer_arguments(args),
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate,
        compute_metrics=make_compute_metrics(data.labels),
        compute_loss_func=make_loss(weights, args.label_smoothing_factor),
        processing_class=processor,
        callbacks=callbacks,
        mixer=batch_mixer(len(data.labels), args.mixup) if args.mixup else None,
        layer_decay=args.layer_decay,
        balanced_labels=train_labels if args.balanced_sampling else None,
    )


def load_weights(model: Any, checkpoint: str | os.PathLike) -> None:
    """Copy a Trainer checkpoint's weights into ``model`` through ``from_pretrained``.

    Trainer's own resume and ``load_best_model_at_end`` feed the saved state dict straight
    into ``load_state_dict``; transformers 5 saves some models (ViT among them) under legacy
    key names, so that path silently skips most weights. ``from_pretrained`` converts them.
    """
    reloaded = type(model).from_pretrained(checkpoint, use_safetensors=True)
    model.load_state_dict(reloaded.state_dict(), strict=True)


def restore_best_model(trainer: Trainer) -> None:
    if trainer.state.best_model_checkpoint:
        load_weights(trainer.accelerator.unwrap_model(trainer.model), trainer.state.best_model_checkpoint)


def device_record(device: torch.device, train_metrics: dict[str, float]) -> dict:
    """What ran the training and how fast: the GPU's name and peak memory (None on a CPU), and the Trainer's
    images per second over the whole run (data loading and the per-epoch evaluations included)."""
    cuda = device.type == "cuda"
    return {
        "accelerator": torch.cuda.get_device_name(device) if cuda else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "train_images_per_second": train_metrics.get("train_samples_per_second"),
    }


def summarise(arguments: Arguments, data: LoadedData, trainer: Trainer, train_seconds: float, validation: dict,
              train_metrics: dict[str, float]) -> dict:
    model_args, data_args, _ = arguments
    state = trainer.state
    return {
        "model": model_args.model,
        "labels": data.labels,
        "data_dir": str(resolve_data_dir(data_args.data_dir)),
        "layout": data.layout,
        "grouped_splits": data.grouped,
        "counts": data.counts,
        "skipped_files": [{"path": str(p), "reason": r} for p, r in data.broken],
        "training_edits": data.training_edits,
        "world_size": trainer.args.world_size,
        "device": str(trainer.args.device),
        **device_record(trainer.args.device, train_metrics),
        "mixed_precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "no",
        "global_step": state.global_step,
        "epochs_run": state.epoch,
        "best_checkpoint": state.best_model_checkpoint,
        "train_seconds": round(train_seconds, 1),
        "validation": validation,
        "arguments": arguments_record(*arguments),
    }


def push_to_hub(trainer: Trainer, args: BoneBreakTrainingArguments, folder: Path) -> None:
    """--push_to_hub: the packaged run folder (calibrated weights, X-ray check, reports, card, ONNX) on top of
    what the Trainer pushed during training."""
    url = upload_folder(repo_id=trainer.hub_model_id, folder_path=folder, token=args.hub_token,
                        commit_message="BoneBreak: calibrated model, reports and model card")
    logger.info("pushed %s to %s", folder, url)


def run_training(model_args: ModelArguments, data_args: DataArguments, args: BoneBreakTrainingArguments,
                 data: LoadedData | None = None) -> dict:
    """Train, select the best epoch by validation macro-F1, evaluate, save. Returns the summary."""
    args = with_output_dir(args, model_args.model)
    if args.push_to_hub and not args.hub_model_id:
        args = replace(args, hub_model_id=Path(args.output_dir).name)  # not the name of the .trainer folder
    logger.info("training into %s (after an interruption, rerun the same command with --output_dir %s --resume)",
                args.output_dir, args.output_dir)
    set_seed(args.seed)
    data = data or prepare_data(data_args, args.seed)
    model, processor = create_model(model_args.model, data.labels, model_args.image_size)
    checkpoint = resume_point(args)
    if checkpoint:
        load_weights(model, checkpoint)  # Trainer restores optimizer, scheduler, RNG and step
    trainer = build_trainer(model_args, data_args, args, data, model, processor)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - started
    restore_best_model(trainer)
    validation = trainer.evaluate()  # on every process: evaluation is collective under DDP
    summary = summarise((model_args, data_args, args), data, trainer, train_seconds, validation, output.metrics)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # the fp32 forward users get
        saved, reports = package_model(model, processor, data, summary, trainer.state.log_history, args.output_dir,
                                       evaluate_test=args.evaluate_test, onnx=args.export_onnx)
        if args.push_to_hub:
            push_to_hub(trainer, args, saved)
        print("\n" + final_message(saved, reports, train_seconds), flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary


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
    ``oof_probabilities.csv`` (input of ``python -m bonebreak.label_issues``).
    """
    args = with_output_dir(args, model_args.model)
    data = load_data(data_args, args.seed)
    per_fold, fold_dirs = [], []
    for fold, fold_data in enumerate(cv_fold_data(data, args.cv_folds, args.seed)):
        fold_args = replace(args, output_dir=str(Path(args.output_dir) / f"fold{fold}"), evaluate_test=False, cv_folds=0,
                            overwrite_output_dir=args.overwrite_output_dir or not args.resume)
        fold_data = edit_training(fold_data, data_args, args.seed)
        fold_dirs.append(Path(fold_args.output_dir))
        if args.resume and (fold_dirs[-1] / "eval_validation" / PROBABILITIES_FILE).is_file():  # finished before an interruption
            logger.info("--resume: fold %d was finished before, reusing %s", fold, fold_dirs[-1])
            summary = json.loads((fold_dirs[-1] / "metrics.json").read_text())
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


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("LOCAL_RANK", "0")) == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    model_args, data_args, args = parse_arguments(argv)
    return run_cv(model_args, data_args, args) if args.cv_folds else run_training(model_args, data_args, args)
