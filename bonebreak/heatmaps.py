"""Heat-map arithmetic: the class activation map of a pooled linear head, Grad-CAM for other
heads, resized to the input.

For a head that global-average-pools the last feature map and applies one linear layer,
Grad-CAM equals CAM: relu(sum_c w[class, c] * features[c]). So the map comes from the same
forward pass as the prediction, with no backward pass (``Predictor.analyse``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def class_activation_map(features: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """CAM: relu(sum_c w[c] * features[c]) for a (C, H, W) feature map and one class's (C,) head weights."""
    return np.maximum(np.tensordot(class_weights, features, axes=1), 0.0)


def grad_cam(model: torch.nn.Module, pixels: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, np.ndarray]:
    """Classic Grad-CAM (forward + backward) of the first image of ``pixels`` for class ``target``
    (None: the predicted class): (logits, features, target, unnormalised map at feature resolution).

    timm-backed models: the feature map that feeds the head; transformers models: the last
    hidden state, whose tokens are laid back on their square patch grid (leading class/register
    tokens dropped).
    """
    with torch.enable_grad():
        timm_model = getattr(model, "timm_model", None)
        if timm_model is not None:
            features = timm_model.forward_features(pixels)
            logits = timm_model.forward_head(features)
        else:
            outputs = model(pixel_values=pixels, output_hidden_states=True)
            logits, features = outputs.logits, outputs.hidden_states[-1]
        target = int(logits[0].argmax()) if target is None else target
        (gradients,) = torch.autograd.grad(logits[0, target], features)
    maps, gradients = features.detach()[0].float(), gradients[0].float()
    if maps.ndim == 2:  # tokens: (T, C) -> (C, g, g)
        grid = int(math.isqrt(maps.shape[0]))
        maps = maps[-grid * grid :].T.reshape(-1, grid, grid)
        gradients = gradients[-grid * grid :].T.reshape(-1, grid, grid)
    weights = gradients.mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=0))
    return logits.detach().float(), features.detach(), target, cam.cpu().numpy()


def upsample(cam: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A feature-resolution map resized to the model's input and scaled to 0..1.

    Bilinear with half-pixel centres, exactly as ``torch.nn.functional.interpolate(...,
    align_corners=False)``, in numpy: a few small matrix products, no thread pool to wake.
    """
    resized = _bilinear(size[0], cam.shape[0]) @ np.asarray(cam, dtype=np.float64) @ _bilinear(size[1], cam.shape[1]).T
    top = float(resized.max())
    return (resized / top if top > 0 else resized).astype(np.float32)


def _bilinear(out: int, size: int) -> np.ndarray:
    """The (out, size) matrix of 1-D bilinear interpolation weights (source index clamped at 0 and size - 1)."""
    source = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    low = np.minimum(source.astype(int), size - 1)
    high = np.minimum(low + 1, size - 1)
    matrix = np.zeros((out, size))
    np.add.at(matrix, (np.arange(out), low), 1.0 - (source - low))
    np.add.at(matrix, (np.arange(out), high), source - low)
    return matrix
