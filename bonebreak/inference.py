"""One inference path for the app, the predict CLI, evaluation and the tests.

``Predictor.from_checkpoint(path)`` loads a checkpoint; ``predict(image)`` decodes,
preprocesses, runs the model and returns calibrated probabilities per label;
``grad_cam(image)`` shows where the model looked. The forward pass runs on PyTorch or, on CPU,
on the checkpoint's ONNX copy (``backend="auto"|"torch"|"onnx"``); preprocessing is the same
Python code either way.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .calibration import TEMPERATURE_KEY, ImageEmbedder, OODDetector
from .images import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image
from .models import load_checkpoint
from .transforms import PreprocessConfig, eval_transform, preprocess_config_from_processor

DEFAULT_UNSURE_BELOW = 0.5
BACKENDS = ("auto", "torch", "onnx")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Probabilities for every label, highest first."""

    probabilities: dict[str, float]
    unsure_below: float = DEFAULT_UNSURE_BELOW
    ood_score: float | None = None  # distance to the nearest training X-ray (None: no detector)
    ood_threshold: float | None = None
    top_label: str = field(init=False)
    top_probability: float = field(init=False)

    def __post_init__(self) -> None:
        label, probability = next(iter(self.probabilities.items()))
        object.__setattr__(self, "top_label", label)
        object.__setattr__(self, "top_probability", probability)

    @property
    def unsure(self) -> bool:
        return self.top_probability < self.unsure_below

    @property
    def not_xray(self) -> bool:
        """True when the image is unlike every training X-ray (photo, screenshot, other scan)."""
        return self.ood_score is not None and self.ood_threshold is not None and self.ood_score > self.ood_threshold

    def top(self, k: int = 3) -> dict[str, float]:
        return dict(list(self.probabilities.items())[:k])


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """A loaded classifier plus the preprocessing it was trained with."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: PreprocessConfig,
        device: str | torch.device | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        unsure_below: float = DEFAULT_UNSURE_BELOW,
        temperature: float = 1.0,
        ood: OODDetector | None = None,
        tta: bool = False,
        onnx: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not 0.0 <= unsure_below <= 1.0:
            raise ValueError(f"unsure threshold must be between 0 and 1, got {unsure_below}")
        self.device = pick_device(str(device) if device else None)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.transform = eval_transform(preprocess)
        self.limits = limits
        self.unsure_below = unsure_below
        config = model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.temperature = temperature
        self.ood = ood
        self.tta = tta  # average the logits of the image and its mirror image
        self.embedder: ImageEmbedder | None = None  # loaded on first use of the X-ray check
        self.onnx = onnx  # pixels -> logits on ONNX Runtime; the PyTorch model still serves Grad-CAM
        self.backend = "onnx" if onnx is not None else "torch"

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | None = None, calibrated: bool = True, backend: str = "torch", **kwargs
    ) -> "Predictor":
        """Load a checkpoint with its fitted temperature and X-ray check (unless ``calibrated=False``).

        ``backend``: "torch", "onnx" (the checkpoint's exported ``model.onnx``; an error names the
        export command when it is missing or stale) or "auto" (ONNX on CPU when usable, else torch).
        """
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        model, processor = load_checkpoint(path)
        if calibrated:
            kwargs.setdefault("temperature", float(getattr(model.config, TEMPERATURE_KEY, None) or 1.0))
            kwargs.setdefault("ood", OODDetector.load(path))
        preprocess = preprocess_config_from_processor(processor, model.config)
        predictor = cls(model, preprocess, device=device, onnx=onnx_forward(path, backend, device), **kwargs)
        logger.info("%s: %s", path, predictor.backend_description)
        return predictor

    @property
    def backend_description(self) -> str:
        """Which engine runs the forward pass, for logs: users should know what they are timing."""
        if self.onnx is not None:
            return "inference backend ONNX Runtime (model.onnx, CPU)"
        return f"inference backend PyTorch ({self.device})"

    def load(self, source: ImageSource) -> Image.Image:
        return load_image(source, self.limits)

    def _batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch on the chosen backend."""
        if self.onnx is not None:
            return self.onnx(pixels)
        return self.model(pixel_values=pixels).logits.float()

    @torch.inference_mode()
    def logits(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Raw logits (n_images, n_labels) for images or paths, decoded in batches."""
        chunks = []
        for start in range(0, len(images), batch_size):
            decoded = [self.load(image) for image in images[start : start + batch_size]]
            pixels = self._batch(decoded)
            logits = self.forward(pixels)
            if self.tta:
                logits = (logits + self.forward(pixels.flip(-1))) / 2
            chunks.append(logits.cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)))

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Calibrated softmax probabilities (n_images, n_labels)."""
        return torch.softmax(torch.from_numpy(self.logits(images, batch_size)) / self.temperature, dim=-1).numpy()

    def ood_scores(self, images: Sequence[ImageSource]) -> np.ndarray | None:
        """Distance of each image to the training X-rays (None without a fitted X-ray check)."""
        if self.ood is None:
            return None
        if self.embedder is None:
            self.embedder = ImageEmbedder(onnx=self.onnx is not None)
        return self.ood.scores(self.embedder([self.load(image) for image in images]))

    def predictions(self, images: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction]:
        decoded = [self.load(image) for image in images]
        probs = self.probabilities(decoded, batch_size)
        scores = self.ood_scores(decoded)
        return [self.to_prediction(p, None if scores is None else scores[i]) for i, p in enumerate(probs)]

    def to_prediction(self, probs: np.ndarray, ood_score: float | None = None) -> Prediction:
        order = np.argsort(-probs)
        return Prediction(
            {self.labels[i]: float(probs[i]) for i in order},
            unsure_below=self.unsure_below,
            ood_score=None if ood_score is None else float(ood_score),
            ood_threshold=self.ood.threshold if self.ood is not None else None,
        )

    def predict(self, source: ImageSource) -> Prediction:
        """Decode one image (path, bytes, PIL or array) and classify it."""
        return self.predictions([source])[0]

    def grad_cam(self, source: ImageSource, label: str | None = None) -> tuple[Image.Image, np.ndarray]:
        """Grad-CAM on the last feature map; returns (model's view of the image, heat map 0..1).

        CNNs give a (C, H, W) feature map; transformers give tokens, which are laid back on
        their square patch grid (leading class/register tokens dropped).
        """
        image = self.load(source)
        view = self.transform(image)
        pixels = view.unsqueeze(0).to(self.device)
        with torch.enable_grad():
            outputs = self.model(pixel_values=pixels, output_hidden_states=True)
            target = self.labels.index(label) if label else int(outputs.logits[0].argmax())
            features = outputs.hidden_states[-1]
            (gradients,) = torch.autograd.grad(outputs.logits[0, target], features)
        features, gradients = features.detach()[0].float(), gradients[0].float()
        if features.ndim == 2:  # tokens: (T, C) -> (C, g, g)
            grid = int(math.isqrt(features.shape[0]))
            features = features[-grid * grid :].T.reshape(-1, grid, grid)
            gradients = gradients[-grid * grid :].T.reshape(-1, grid, grid)
        weights = gradients.mean(dim=(1, 2), keepdim=True)
        cam = torch.relu((weights * features).sum(dim=0))
        cam = torch.nn.functional.interpolate(cam[None, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        cam = cam / cam.max() if float(cam.max()) > 0 else cam
        mean = torch.tensor(self.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(3, 1, 1)
        view_rgb = ((view * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        return Image.fromarray(view_rgb), cam.cpu().numpy()


class Ensemble:
    """Mean of the calibrated probabilities of several checkpoints (fold models, distillation teachers)."""

    def __init__(self, folders: Sequence[str | os.PathLike], device: str | None = "cpu") -> None:
        if not folders:
            raise ValueError("an ensemble needs at least one checkpoint folder")
        self.members = [Predictor.from_checkpoint(folder, device=device, backend="auto") for folder in folders]
        self.labels = self.members[0].labels
        if any(member.labels != self.labels for member in self.members):
            raise ValueError(f"ensemble members must share one label list: {[str(f) for f in folders]}")

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        return np.mean([member.probabilities(images, batch_size) for member in self.members], axis=0)


def onnx_forward(path: str | os.PathLike, backend: str, device: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ONNX Runtime forward for ``backend`` ("auto" falls back to torch with the reason logged)."""
    from .export import OnnxUnavailable, load_onnx

    if backend == "torch":
        return None
    if pick_device(device).type != "cpu":
        if backend == "onnx":
            raise ValueError("--backend onnx runs on CPU only; use --backend torch (or auto) on a GPU")
        return None
    try:
        return load_onnx(path)
    except OnnxUnavailable as error:
        if backend == "onnx":
            raise ValueError(str(error)) from error
        logger.info("using PyTorch, not ONNX Runtime: %s", error)
        return None


def overlay_heatmap(view: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a 0..1 heat map (jet colours) over the image the model saw."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)
    return Image.blend(view.convert("RGB"), Image.fromarray(colours).resize(view.size), alpha)
