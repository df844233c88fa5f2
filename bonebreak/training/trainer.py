"""Fine-tune a fracture classifier with the Hugging Face ``Trainer``: build it, run it, hand the model to ``finalize``.

``python train.py`` and ``accelerate launch train.py`` (one or many GPUs, several nodes, or
two CPU processes over gloo) run the same code: Accelerate decides the device and the
process group. The settings are in ``arguments.py`` (every ``TrainingArguments`` flag works), what
the machine decides in ``setup.py``, the optional recipe pieces in ``options.py``, cross-validation in
``cross_validation.py``, and what happens after training (calibration, reports, model card, saving)
in ``finalize.py``.
"""

from __future__ import annotations

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

from ..common.checkpoint_format import EQUALIZE_KEY
from ..data.layouts import resolve_data_dir
from ..data.loading import DecodedImages, LoadedData, load_splits
from ..data.training_edits import edit_training_split
from ..evaluation.metrics import classification_metrics, headline
from ..models.factory import create_model, preprocess_config_of
from .arguments import BoneBreakTrainingArguments, DataArguments, ModelArguments, arguments_record
from .augment import AugmentConfig, collate, eval_transform, train_transform
from .finalize import final_message, package_model
from .options import (
    WeightAverage,
    balanced_sampler,
    batch_mixer,
    class_weights,
    distillation_targets,
    layer_decay_groups,
    make_loss,
    mix_batch,
)
from .setup import precision_of, set_up_run

logger = logging.getLogger(__name__)

RESUME_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def load_data(data: DataArguments, seed: int) -> LoadedData:
    """Every split of ``--data_dir`` as found, before the options that thin or fix the training images."""
    return load_splits(resolve_data_dir(data.data_dir), val_fraction=data.val_fraction, seed=seed, split_manifest=data.split_manifest)


def edit_training(data: LoadedData, options: DataArguments, seed: int) -> LoadedData:
    """``--dedup_groups``, ``--exclude_file``, ``--relabel_file``, ``--max_train_samples``, ``--extra_train_dir``: the train split only."""
    edited, _ = edit_training_split(data, seed=seed, dedup_groups=options.dedup_groups, exclude_file=options.exclude_file,
                                    relabel_file=options.relabel_file, max_train_samples=options.max_train_samples,
                                    extra_train_dir=options.extra_train_dir)
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
    preprocess = preprocess_config_of(model, processor)
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


def run_summary(arguments: tuple[ModelArguments, DataArguments, BoneBreakTrainingArguments], data: LoadedData, trainer: Trainer, train_seconds: float, validation: dict,
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
        "precision": precision_of(trainer.args),
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
    args = set_up_run(args, model_args.model)
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
    summary = run_summary((model_args, data_args, args), data, trainer, train_seconds, validation, output.metrics)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # the fp32 forward users get
        saved, reports = package_model(model, processor, data, summary, trainer.state.log_history, args.output_dir,
                                       evaluate_test=args.evaluate_test, onnx=args.export_onnx, similar_cases=args.similar_cases)
        if args.push_to_hub:
            push_to_hub(trainer, args, saved)
        print("\n" + final_message(saved, reports, train_seconds), flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary
