"""Training's image pipeline: X-ray-friendly augmentation (torchvision), ending in the one normalisation
serving uses (``bonebreak.data.preprocess``), and the batch collation the Trainer takes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..data.preprocess import PreprocessConfig, equalize, normalise, preprocess

AUGMENT_POLICIES = ("basic", "trivial", "randaugment")
_INTERPOLATION = {"nearest": v2.InterpolationMode.NEAREST, "bilinear": v2.InterpolationMode.BILINEAR,
                  "bicubic": v2.InterpolationMode.BICUBIC, "lanczos": v2.InterpolationMode.LANCZOS}


@dataclass(frozen=True)
class AugmentConfig:
    """X-ray-friendly augmentation strengths (no colour hue: radiographs are grey)."""

    min_crop_scale: float = 0.6
    hflip: float = 0.5
    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    policy: str = "basic"  # one of AUGMENT_POLICIES

    def __post_init__(self) -> None:
        if self.policy not in AUGMENT_POLICIES:
            raise ValueError(f"--augment: unknown policy '{self.policy}'; choose one of {', '.join(AUGMENT_POLICIES)}")


def _policy_ops(policy: str) -> list[Callable]:
    # TrivialAugment/RandAugment pick their own ops and strengths per image (no tuning needed).
    if policy == "trivial":
        return [v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)]
    if policy == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BILINEAR)]
    return []


def _tensor(image: Image.Image, cfg: PreprocessConfig, crop: bool) -> torch.Tensor:
    return torch.from_numpy(preprocess(image, cfg) if crop else normalise(image, cfg))


def eval_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Serving's preprocessing, as a tensor for the Trainer's evaluation (functools.partial: data-loading
    workers started by spawn must be able to pickle it)."""
    return partial(_tensor, cfg=cfg, crop=True)


def train_transform(cfg: PreprocessConfig, aug: AugmentConfig = AugmentConfig()) -> v2.Compose:
    interpolation = _INTERPOLATION[cfg.interpolation]
    return v2.Compose(
        [partial(equalize, cfg=cfg),
         v2.RandomResizedCrop(cfg.image_size, scale=(aug.min_crop_scale, 1.0), interpolation=interpolation, antialias=True),
         v2.RandomHorizontalFlip(aug.hflip),
         *_policy_ops(aug.policy),
         v2.RandomRotation(aug.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR),
         v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
         partial(_tensor, cfg=cfg, crop=False)]
    )


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    labels = [e["labels"] for e in examples]
    soft = not isinstance(labels[0], int)  # class probabilities (distillation) instead of a class index
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.as_tensor(np.stack(labels), dtype=torch.float32) if soft else torch.tensor(labels, dtype=torch.long),
    }
