"""The optional pieces of a training recipe, each off by default: what timm ships, plus our loss and targets.

- batch mixing: ``timm.data.Mixup`` (MixUp or CutMix, on a fraction of batches),
- an exponential moving average of the weights: ``timm.utils.ModelEmaV3``, swapped in for evaluation,
- layer-wise learning-rate decay: ``timm.optim.param_groups_layer_decay``,
- class weights and class-balanced sampling, the loss, and distillation targets.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from transformers import TrainerCallback

from ..data.loading import image_paths, label_index_map
from ..models.torch_backend import load_ensemble

logger = logging.getLogger(__name__)

MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0


def batch_mixer(num_classes: int, prob: float) -> Mixup:
    """timm's Mixup on a fraction ``prob`` of batches, MixUp or CutMix with equal chance; targets stay unsmoothed
    (the loss applies ``--label_smoothing_factor`` to every batch alike)."""
    return Mixup(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, prob=prob, switch_prob=0.5, mode="batch",
                 label_smoothing=0.0, num_classes=num_classes)


def mix_batch(mixer: Mixup, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Soft targets for a training batch; an odd-sized batch (timm mixes pairs) is left as it is."""
    if len(inputs["labels"]) % 2:
        return inputs
    pixels, labels = mixer(inputs["pixel_values"], inputs["labels"])
    return {**inputs, "pixel_values": pixels, "labels": labels}


def layer_decay_groups(model: Any, learning_rate: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups whose learning rate shrinks by ``layer_decay`` per stage towards the stem."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is None:
        raise ValueError(f"--layer_decay needs a timm-backed model (efficientnet_lite0/1/2 or a timm/ Hub id), not {type(model).__name__}")
    groups = param_groups_layer_decay(timm_model, weight_decay=weight_decay, layer_decay=layer_decay)
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": learning_rate * g.get("lr_scale", 1.0)} for g in groups]


class WeightAverage(TrainerCallback):
    """timm's ``ModelEmaV3`` of the weights, swapped in for each epoch-end evaluation and save.

    The Trainer evaluates and saves right after ``on_epoch_end``, so the selected and saved model
    is the average; ``on_epoch_begin`` swaps the raw weights back before training continues.
    The decay warms up as t / (10 + t) after t updates, so early averages do not cling to the start.
    """

    def __init__(self, decay: float) -> None:
        self.decay, self.ema, self.swapped = decay, None, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True, warmup_gamma=10.0, warmup_power=1.0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model, step=state.global_step)

    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's floating-point weights and buffers with the average's."""
        with torch.no_grad():
            for live, average in zip(model.state_dict().values(), self.ema.module.state_dict().values()):
                if live.is_floating_point():
                    scratch = live.clone()
                    live.copy_(average)
                    average.copy_(scratch)
        self.swapped = not self.swapped

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.ema is not None and not self.swapped:
            self.swap(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.swapped:
            self.swap(model)


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: list[int], seed: int) -> torch.utils.data.Sampler:
    """Draw images with probability inverse to their class frequency; the same draw on every process."""
    counts = np.bincount(labels)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(1.0 / counts[labels], num_samples=len(labels), replacement=True, generator=generator)


def make_loss(weights: torch.Tensor | None, label_smoothing: float):
    """Cross-entropy on class indices, or on soft targets from mixing or distillation."""

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs.logits.float()
        weight = weights.to(logits.device) if weights is not None else None
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)

    return loss


def distillation_targets(split: datasets.Dataset, labels: list[str], teachers: list[str], weight: float) -> np.ndarray:
    """(1 - weight) x one-hot true label + weight x the teachers' mean calibrated probabilities."""
    ensemble = load_ensemble(teachers)
    if sorted(ensemble.labels) != sorted(labels):
        raise ValueError(f"--distill_from teachers know {ensemble.labels}, the data has {labels}")
    logger.info("distillation: %d teacher(s) label %d training images", len(teachers), len(split))
    teacher = ensemble.probabilities(image_paths(split))[:, label_index_map(labels, ensemble.labels)]  # to the data's label order
    onehot = np.eye(len(labels), dtype=np.float32)[np.asarray(split["label"])]
    return ((1 - weight) * onehot + weight * teacher).astype(np.float32)
