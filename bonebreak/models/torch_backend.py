"""The PyTorch backend of serving: a checkpoint's network as a ``bonebreak.serving.predictor.Forward`` (what
``model.onnx`` computes, from the same module), plus Grad-CAM for heads whose network has no class maps.

Serving never imports this module (a Space runs without PyTorch); commands that have PyTorch pass
``TorchForward.from_checkpoint`` to ``bonebreak.serving.loader`` (``load_classifier`` below does).
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import numpy as np
import torch

from ..common.checkpoint_format import CLASS_MAPS, EMBEDDING, LOGITS
from ..data.decode import DEFAULT_LIMITS, DecodeLimits
from ..serving.ensemble import Ensemble
from ..serving.loader import load_classifier as load_for_serving
from ..serving.loader import load_ensemble as load_ensemble_for_serving
from ..serving.predictor import DEFAULT_UNSURE_BELOW, Predictor
from .checkpoints import load_checkpoint
from .factory import classifier_head


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def linear_cam_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The classifier's linear head when logits = head(global average of the last feature map).

    For such a head Grad-CAM equals CAM, relu(sum_c w[class, c] * features[c]), so the heat map
    needs no backward pass. Only timm-backed models with a (B, C, H, W) feature map qualify, and
    only when ``forward_head`` is checked to be exactly pooling + that layer (a head with layers
    after the pooling, such as MobileNetV3's, is refused). None otherwise (ViT tokens, ...).
    """
    timm_model = getattr(model, "timm_model", None)
    head = classifier_head(model)
    if timm_model is None or head is None or getattr(timm_model, "num_features", None) != head.in_features:
        return None
    probe = torch.randn(2, head.in_features, 3, 3, generator=torch.Generator().manual_seed(0))
    probe = probe.to(head.weight.device, head.weight.dtype)
    was_training = timm_model.training
    timm_model.eval()
    try:
        with torch.inference_mode():
            expected = torch.nn.functional.linear(probe.mean(dim=(2, 3)), head.weight, head.bias)
            same = torch.allclose(timm_model.forward_head(probe), expected, rtol=1e-4, atol=1e-5)
    except Exception:  # a head that cannot take a small (B, C, H, W) map is not a pooled linear one
        same = False
    finally:
        timm_model.train(was_training)
    return head if same else None


class ServingOutputs(torch.nn.Module):
    """A classifier as pixels -> (logits, embedding[, class_maps]): what ``model.onnx`` computes, and what the
    PyTorch backend computes too, so both backends answer alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cam_head = linear_cam_head(model)
        self.head = classifier_head(model)
        self._head_input: list[torch.Tensor] = []
        if self.cam_head is None and self.head is not None:  # the head's input is the embedding: catch it on the way in
            self.head.register_forward_pre_hook(lambda _, inputs: self._head_input.append(inputs[0]))

    @property
    def output_names(self) -> list[str]:
        return [LOGITS] + ([EMBEDDING] if self.head is not None else []) + ([CLASS_MAPS] if self.cam_head is not None else [])

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.cam_head is not None:
            timm_model = self.model.timm_model
            features = timm_model.forward_features(pixel_values)
            embedding = timm_model.forward_head(features, pre_logits=True)
            logits = self.cam_head(embedding)
            class_maps = torch.einsum("kc,bchw->bkhw", self.cam_head.weight, features)
            return logits, embedding, class_maps
        self._head_input.clear()
        logits = self.model(pixel_values=pixel_values).logits
        if self.head is None:
            return (logits,)
        return logits, self._head_input[-1].flatten(1)


def _patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The last g * g of (T, C) tokens: the square patch grid, without leading class/register tokens."""
    grid = int(math.isqrt(tokens.shape[0]))
    return tokens[-grid * grid :]


def grad_cam(model: torch.nn.Module, pixels: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, np.ndarray]:
    """Classic Grad-CAM (forward + backward) of the first image of ``pixels`` for class ``target``
    (None: the predicted class): (logits, features, target, unnormalised map at feature resolution).

    timm-backed models: the feature map that feeds the head; transformers models: the last
    hidden state, whose tokens are laid back on their square patch grid (leading class/register
    tokens dropped). A head that reads only the class token (ViT) gets no gradient on the last
    hidden state's patch tokens, so there the last block's input is used (as Grad-CAM for ViT does).
    """
    with torch.enable_grad():
        timm_model = getattr(model, "timm_model", None)
        if timm_model is not None:
            features = timm_model.forward_features(pixels)
            logits = timm_model.forward_head(features)
            target = int(logits[0].argmax()) if target is None else target
            (gradients,) = torch.autograd.grad(logits[0, target], features)
        else:
            outputs = model(pixel_values=pixels, output_hidden_states=True)
            logits, hidden = outputs.logits, outputs.hidden_states
            target = int(logits[0].argmax()) if target is None else target
            candidates = list(hidden[-2:]) if len(hidden) > 1 and hidden[-1].ndim == 3 else [hidden[-1]]
            grads = torch.autograd.grad(logits[0, target], candidates, allow_unused=True)
            features, gradients = candidates[-1], grads[-1]
            if len(candidates) == 2 and not _patch_tokens(gradients[0]).any() and grads[0] is not None:
                features, gradients = candidates[0], grads[0]  # a class-token head: the last block's input
    maps, gradients = features.detach()[0].float(), gradients[0].float()
    if maps.ndim == 2:  # tokens: (T, C) -> (C, g, g)
        grid = int(math.isqrt(maps.shape[0]))
        maps = _patch_tokens(maps).T.reshape(-1, grid, grid)
        gradients = _patch_tokens(gradients).T.reshape(-1, grid, grid)
    weights = gradients.mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=0))
    return logits.detach().float(), features.detach(), target, cam.cpu().numpy()


class TorchForward:
    """A classifier on PyTorch as a serving ``Forward``: numpy batch in, ``ServingOutputs`` out as numpy."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None) -> None:
        self.device = pick_device(str(device) if device else None)
        self.model = model.to(self.device).eval()
        self.outputs = ServingOutputs(self.model).eval()
        self.output_names = self.outputs.output_names
        self.description = f"PyTorch ({self.device})"

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = None) -> "TorchForward":
        model, _ = load_checkpoint(path)
        return cls(model, device)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.outputs(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device))
        return {name: tensor.float().cpu().numpy() for name, tensor in zip(self.output_names, outputs)}

    def grad_cam(self, pixels: np.ndarray, target: int) -> np.ndarray:
        return grad_cam(self.model, torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device), target)[3]


def load_classifier(path: str | os.PathLike, backend: str = "auto", device: str | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
                    unsure_below: float = DEFAULT_UNSURE_BELOW) -> Predictor | Ensemble:
    """What a checkpoint folder serves, with PyTorch available as a backend (``--device cuda`` means PyTorch)."""
    if device and device != "cpu" and backend == "auto":
        backend = "torch"
    return load_for_serving(path, backend, partial(TorchForward.from_checkpoint, device=device), limits, unsure_below)


def load_ensemble(folders: list[Any], device: str | None = None) -> Ensemble:
    """Checkpoint folders (fold models, teachers) as one ensemble, each on ONNX Runtime when it can, else PyTorch."""
    return load_ensemble_for_serving(folders, "auto", partial(TorchForward.from_checkpoint, device=device))
