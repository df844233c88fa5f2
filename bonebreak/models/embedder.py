"""Generic ImageNet image features (EfficientNet-Lite0, offline weights): what the near-duplicate audit compares
and what the X-ray check embeds (exported to ONNX for serving by ``onnx_export.export_xray_check``)."""

from __future__ import annotations

from dataclasses import replace
import numpy as np
import torch
from transformers import TimmWrapperForImageClassification

from ..data.preprocess import PreprocessConfig
from .factory import efficientnet_lite, preprocess_config_of


def imagenet_embedder() -> tuple[TimmWrapperForImageClassification, PreprocessConfig]:
    """EfficientNet-Lite0 with its ImageNet head, and its preprocessing without a centre crop.

    No centre crop: on a long thin radiograph it would keep a different middle part of each
    cropped copy, and the X-ray check should see the whole picture.
    """
    model, processor = efficientnet_lite(0)
    model.eval()
    return model, replace(preprocess_config_of(model, processor), crop_pct=1.0)


class PooledFeatures(torch.nn.Module):
    """A timm-backed classifier's pooled pre-logit features (1280-d for EfficientNet-Lite0)."""

    def __init__(self, model: TimmWrapperForImageClassification) -> None:
        super().__init__()
        self.timm_model = model.timm_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.timm_model.forward_head(self.timm_model.forward_features(pixel_values), pre_logits=True)


def embed_pixels(model: TimmWrapperForImageClassification, pixels: torch.Tensor) -> np.ndarray:
    """L2-normalised pooled features, each averaged with its mirror image's, so a flipped copy embeds alike."""
    with torch.inference_mode():
        both = torch.cat([pixels, torch.flip(pixels, dims=[3])])
        pooled = PooledFeatures(model)(both)
        features_sum = pooled[: len(pixels)] + pooled[len(pixels) :]
        return torch.nn.functional.normalize(features_sum, dim=1).numpy()
