"""The one evaluation preprocessing, shared by training's evaluation, the app, prediction and the X-ray check.

Image size, mean/std, crop and interpolation come from the checkpoint (``preprocess_config``), never
from literals, so a ViT saved with mean 0.5 and an EfficientNet saved with ImageNet statistics are each
fed exactly what they were trained on. numpy and Pillow only, so a Space serves without PyTorch; the
steps are those of torchvision's ``Resize(short side) -> CenterCrop -> ToImage -> ToDtype(scale) ->
Normalize`` on a PIL image, which training used before and whose pixels these equal
(tests/test_preprocess.py). Training's augmentation (``bonebreak.training.augment``) ends in ``normalise``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps

from ..common.checkpoint_format import EQUALIZE_KEY

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_PIL_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}
# timm's defaults (timm.data.resolve_data_config) for a pretrained_cfg that leaves a value out
TIMM_DEFAULTS = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                 "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
_SCALE = np.float32(1.0 / 255)


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects: square input side, normalisation and the eval crop."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    equalize: bool = False  # histogram-equalise before resizing (a training choice, saved in the model config)

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"unknown interpolation '{self.interpolation}'; expected one of {', '.join(RESAMPLE)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) else None
    return int(value) if value else None


def _timm_config(pretrained_cfg: Mapping[str, Any], equalize: bool) -> PreprocessConfig:
    def value(key: str) -> Any:
        return pretrained_cfg.get(key) or TIMM_DEFAULTS[key]

    return PreprocessConfig(image_size=int(value("input_size")[-1]), mean=tuple(float(v) for v in value("mean")),
                            std=tuple(float(v) for v in value("std")), crop_pct=float(value("crop_pct")),
                            interpolation=str(value("interpolation")), equalize=equalize)


def preprocess_config(processor: Mapping[str, Any] | None, model_config: Mapping[str, Any]) -> PreprocessConfig:
    """Read size/mean/std/crop from a checkpoint: ``model_config`` is config.json (a timm-backed model keeps its
    ``pretrained_cfg`` there), ``processor`` is preprocessor_config.json of any other model (None for timm)."""
    equalize = bool(model_config.get(EQUALIZE_KEY, False))
    if model_config.get("pretrained_cfg") and (processor is None or model_config.get("model_type") == "timm_wrapper"):
        return _timm_config(model_config["pretrained_cfg"], equalize)
    if processor is None:
        raise ValueError("the checkpoint has no preprocessor_config.json and no timm pretrained_cfg: its input size is unknown")
    size, crop_size = processor.get("size"), processor.get("crop_size")
    crop = _size_value(crop_size, "height") if processor.get("do_center_crop") else None
    height, shortest = _size_value(size, "height"), _size_value(size, "shortest_edge")
    if crop and shortest:
        image_size, crop_pct = crop, crop / shortest
    elif height:
        image_size, crop_pct = height, 1.0
    elif shortest:
        image_size, crop_pct = shortest, float(processor.get("crop_pct") or 1.0)
        if image_size >= 384:  # ConvNeXt's rule: large inputs are warped, not cropped
            crop_pct = 1.0
    else:
        raise ValueError(f"cannot read an input size from the image processor settings {dict(processor)}")
    resample = processor.get("resample", 3)
    return PreprocessConfig(
        image_size=image_size,
        mean=tuple(float(v) for v in processor["image_mean"]),
        std=tuple(float(v) for v in processor["image_std"]),
        crop_pct=min(crop_pct, 1.0),
        interpolation=_PIL_RESAMPLE_NAMES.get(int(resample), "bicubic") if resample is not None else "bicubic",
        equalize=equalize,
    )


def equalize(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    # Spreads each radiograph's grey levels over the full range: exposure differs a lot between sources.
    return ImageOps.equalize(image) if cfg.equalize else image


def resize_and_crop(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Equalise (if the model was trained so), resize the short side to image_size / crop_pct, crop the centre square."""
    image = equalize(image, cfg)
    resize = int(round(cfg.image_size / cfg.crop_pct))
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), resample=RESAMPLE[cfg.interpolation])
    top, left = int(round((new_height - cfg.image_size) / 2.0)), int(round((new_width - cfg.image_size) / 2.0))
    return image.crop((left, top, left + cfg.image_size, top + cfg.image_size))


def normalise(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB image as the (3, H, W) float32 array the network takes: scaled to 0..1, minus mean, over std."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) * _SCALE
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (array - mean) / std


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Evaluation preprocessing of one decoded RGB image: (3, image_size, image_size) float32."""
    return normalise(resize_and_crop(image, cfg), cfg)


def preprocess_batch(images: list[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    return np.stack([preprocess(image, cfg) for image in images]) if images else np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32)


def model_view(pixels: np.ndarray, cfg: PreprocessConfig) -> Image.Image:
    """A preprocessed (3, H, W) array as the picture the model saw (normalisation undone)."""
    mean, std = np.asarray(cfg.mean, dtype=np.float32), np.asarray(cfg.std, dtype=np.float32)
    rgb = np.clip(np.asarray(pixels, dtype=np.float32).transpose(1, 2, 0) * std + mean, 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8))
