"""The one preprocessing module shared by training, evaluation, the CLI and the app.

Image size, mean/std and crop come from the checkpoint's image processor (never literals),
so a ViT saved with mean 0.5 and an EfficientNet saved with ImageNet statistics are each
fed exactly what they were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import ImageOps
from torchvision.transforms import v2

EQUALIZE_KEY = "bonebreak_equalize"  # model-config key written by training
_PIL_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}
_INTERPOLATION = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "lanczos": v2.InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects: square input side, normalisation and the eval crop."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    equalize: bool = False  # histogram-equalise before resizing (a training choice, saved in the model config)


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
            raise ValueError(f"unknown augmentation policy '{self.policy}'; choose one of {', '.join(AUGMENT_POLICIES)}")


def _policy_ops(policy: str) -> list[Callable]:
    # TrivialAugment/RandAugment pick their own ops and strengths per image (no tuning needed).
    if policy == "trivial":
        return [v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)]
    if policy == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BILINEAR)]
    return []


AUGMENT_POLICIES = ("basic", "trivial", "randaugment")


def _size_value(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def preprocess_config_from_processor(processor: Any, model_config: Any = None) -> PreprocessConfig:
    """Read size/mean/std from a timm-wrapper or a transformers image processor (and our
    equalisation flag from the model config, where training saved it)."""
    equalize = bool(getattr(model_config, EQUALIZE_KEY, False))
    data_config = getattr(processor, "data_config", None)
    if data_config is not None:  # TimmWrapperImageProcessor
        return PreprocessConfig(
            image_size=int(data_config["input_size"][-1]),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            crop_pct=float(data_config.get("crop_pct") or 1.0),
            interpolation=str(data_config.get("interpolation") or "bicubic"),
            equalize=equalize,
        )
    size, crop_size = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    crop = _size_value(crop_size, "height") if getattr(processor, "do_center_crop", False) else None
    height, shortest = _size_value(size, "height"), _size_value(size, "shortest_edge")
    if crop and shortest:
        image_size, crop_pct = crop, crop / shortest
    elif height:
        image_size, crop_pct = height, 1.0
    elif shortest:
        image_size, crop_pct = shortest, float(getattr(processor, "crop_pct", None) or 1.0)
        if image_size >= 384:  # ConvNeXt's rule: large inputs are warped, not cropped
            crop_pct = 1.0
    else:
        raise ValueError(f"cannot read an input size from image processor {type(processor).__name__}")
    resample = getattr(processor, "resample", 3)
    return PreprocessConfig(
        image_size=image_size,
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        crop_pct=crop_pct,
        interpolation=_PIL_RESAMPLE_NAMES.get(int(resample), "bicubic") if resample is not None else "bicubic",
        equalize=equalize,
    )


def _to_normalised_tensor(cfg: PreprocessConfig) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]


def _equalize(cfg: PreprocessConfig) -> list[Callable]:
    # Spreads each radiograph's grey levels over the full range: exposure differs a lot between sources.
    return [ImageOps.equalize] if cfg.equalize else []


def eval_transform(cfg: PreprocessConfig) -> v2.Compose:
    resize = int(round(cfg.image_size / cfg.crop_pct))
    interpolation = _INTERPOLATION[cfg.interpolation]
    return v2.Compose(
        _equalize(cfg)
        + [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(cfg.image_size)]
        + _to_normalised_tensor(cfg)
    )


def train_transform(cfg: PreprocessConfig, aug: AugmentConfig = AugmentConfig()) -> v2.Compose:
    interpolation = _INTERPOLATION[cfg.interpolation]
    return v2.Compose(
        _equalize(cfg)
        + [
            v2.RandomResizedCrop(cfg.image_size, scale=(aug.min_crop_scale, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(aug.hflip),
        ]
        + _policy_ops(aug.policy)
        + [
            v2.RandomRotation(aug.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR),
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
        ]
        + _to_normalised_tensor(cfg)
    )


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    labels = [e["labels"] for e in examples]
    soft = not isinstance(labels[0], int)  # class probabilities (distillation) instead of a class index
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.as_tensor(np.stack(labels), dtype=torch.float32) if soft else torch.tensor(labels, dtype=torch.long),
    }
