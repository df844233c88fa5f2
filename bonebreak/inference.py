"""One inference path for the app, the predict CLI, evaluation and the tests.

``Predictor.from_checkpoint(path)`` loads a checkpoint; ``predict(image)`` decodes,
preprocesses, runs the model and returns calibrated probabilities per label;
``analyse(image)`` also returns where the model looked, from the same forward pass. The forward
pass runs on PyTorch or, on CPU, on the checkpoint's ONNX copy (``backend="auto"|"torch"|"onnx"``);
preprocessing is the same Python code either way. Every method accepts an image that
``Predictor.load`` already decoded and does not decode it again.
"""

from __future__ import annotations

import logging
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .calibration import TEMPERATURE_KEY
from .heatmaps import class_activation_map, grad_cam, upsample
from .images import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image
from .ensembles import ensemble_members
from .models import load_checkpoint
from .onnx_backend import LogitsAndFeatures, linear_cam_head, select_onnx
from .ood import ImageEmbedder, OODDetector
from .transforms import PreprocessConfig, eval_transform, preprocess_config_from_processor

DEFAULT_UNSURE_BELOW = 0.5
BACKENDS = ("auto", "torch", "onnx")
BACKEND_HELP = "auto (ONNX Runtime on CPU when the checkpoint has an up-to-date model.onnx, else PyTorch), torch or onnx."


def check_backend(backend: str) -> str:
    """The --backend value, or a ValueError naming the flag and its choices."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    return backend

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


@dataclass(frozen=True)
class Analysis:
    """One image, one forward pass: the prediction and, when asked for, where the model looked."""

    prediction: Prediction
    view: Image.Image  # the picture the model saw (resized, cropped; normalisation undone)
    heatmap: np.ndarray | None = None  # 0..1, the view's size; None when not asked for
    heatmap_label: str | None = None  # the class the heat map is for


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
        partners: Sequence["Predictor"] = (),
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
        self.tta = tta  # average the logits of the image and its mirror image
        self.onnx = onnx  # pixels -> logits (and the feature map) on ONNX Runtime
        self.backend = "onnx" if onnx is not None else "torch"
        # An ensemble checkpoint's members/: each classifies the same decoded image with its own preprocessing; the
        # prediction is the mean of all calibrated probabilities. The heat map and the X-ray check stay this model's.
        self.partners = list(partners)
        if any(partner.labels != self.labels for partner in self.partners):
            raise ValueError(f"ensemble members must share one label list: {[p.labels for p in self.partners]} vs {self.labels}")
        # A pooled linear head makes the heat map a by-product of the forward pass (CAM): its class
        # weights are read once here; other heads (ViT tokens, ...) get Grad-CAM, forward + backward.
        head = linear_cam_head(self.model)
        self.cam_weights = None if head is None else head.weight.detach().float().cpu().numpy()
        self._with_features = None if head is None else LogitsAndFeatures(self.model).eval()
        self._decoded: weakref.WeakValueDictionary[int, Image.Image] = weakref.WeakValueDictionary()
        self.embedder: ImageEmbedder | None = None
        self._shared_input = False
        self._xray_worker: ThreadPoolExecutor | None = None
        self.ood = ood  # builds the X-ray check's embedder now, at start-up, not on the first request

    @property
    def ood(self) -> OODDetector | None:
        return self._ood

    @ood.setter
    def ood(self, detector: OODDetector | None) -> None:
        self._ood = detector
        if detector is not None and (self.embedder is None or self.embedder.embedding.name != detector.embedding):
            self.embedder = ImageEmbedder(onnx=self.onnx is not None, embedding=detector.embedding)
            # The classifier's input serves the X-ray check too when both preprocess alike (the shipped model does).
            probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8))
            self._shared_input = torch.equal(self.transform(probe), self.embedder.transform(probe))
            # analyse() runs the X-ray check's network beside the classifier's (ONNX Runtime releases the GIL):
            # 16 ms a request instead of 19.5 on a 2-core CPU.
            if self.embedder.features is not None and self._xray_worker is None:
                self._xray_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonebreak-xray-check")

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | None = None, calibrated: bool = True, backend: str = "torch", **kwargs
    ) -> "Predictor":
        """Load a checkpoint with its fitted temperature, X-ray check and ensemble partners (unless ``calibrated=False``).

        ``backend``: "torch", "onnx" (the checkpoint's exported ``model.onnx``; an error names the
        export command when it is missing or stale) or "auto" (ONNX on CPU when usable, else torch).
        ``calibrated=False`` gives this folder's own model alone, uncalibrated: what fitting a temperature needs.
        """
        check_backend(backend)
        model, processor = load_checkpoint(path)
        if calibrated:
            kwargs.setdefault("temperature", float(getattr(model.config, TEMPERATURE_KEY, None) or 1.0))
            kwargs.setdefault("ood", OODDetector.load(path))
            kwargs.setdefault("partners", [cls.from_checkpoint(member, device=device, backend=backend, ood=None, tta=kwargs.get("tta", False))
                                           for member in ensemble_members(path)])
        preprocess = preprocess_config_from_processor(processor, model.config)
        predictor = cls(model, preprocess, device=device, onnx=select_onnx(path, backend, pick_device(device).type == "cpu"), **kwargs)
        logger.info("%s: %s", path, predictor.backend_description)
        return predictor

    @property
    def backend_description(self) -> str:
        """Which engine runs the forward pass, for logs: users should know what they are timing."""
        engine = "ONNX Runtime (model.onnx, CPU)" if self.onnx is not None else f"PyTorch ({self.device})"
        return f"inference backend {engine}" + "".join(f"; ensemble partner: {p.backend_description}" for p in self.partners)

    def load(self, source: ImageSource) -> Image.Image:
        """Decode with ``load_image``; an image this Predictor decoded before is handed back as it is."""
        if isinstance(source, Image.Image) and self._decoded.get(id(source)) is source:
            return source
        image = load_image(source, self.limits)
        self._decoded[id(image)] = image
        return image

    def _batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch on the chosen backend."""
        if self.onnx is not None:
            return self.onnx(pixels)
        return self.model(pixel_values=pixels).logits.float()

    def forward_with_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the last feature map (B, C, H, W) from one forward pass (pooled linear heads only)."""
        if self._with_features is None:
            raise ValueError("this model's head is not a linear layer on pooled features: use grad_cam")
        if "features" in getattr(self.onnx, "output_names", ()):
            outputs = self.onnx.outputs(pixels)
            return outputs["logits"], outputs["features"]
        with torch.inference_mode():  # PyTorch, or a model.onnx exported without the feature map
            logits, features = self._with_features(pixels)
        return logits.float(), features.float()

    @torch.inference_mode()
    def logits(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Raw logits (n_images, n_labels) of this model alone (no partners), for images or paths, decoded in batches."""
        chunks = [self._logits_of(self._batch([self.load(image) for image in images[start : start + batch_size]])).cpu().numpy()
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)))

    def _logits_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch, averaged with its mirror image under ``tta``."""
        logits = self.forward(pixels)
        return (logits + self.forward(pixels.flip(-1))) / 2 if self.tta else logits

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Calibrated softmax probabilities (n_images, n_labels), averaged with the partners' when there are any."""
        chunks = [self._decoded_probabilities([self.load(image) for image in images[start : start + batch_size]])
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)))

    def _softmax(self, logits: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.as_tensor(logits, dtype=torch.float32) / self.temperature, dim=-1).numpy()

    @torch.inference_mode()  # analyse() may call it for the partners after its own backward pass
    def _decoded_probabilities(self, decoded: Sequence[Image.Image]) -> np.ndarray:
        return self._with_partners(self._softmax(self._logits_of(self._batch(decoded)).cpu().numpy()), decoded)

    def _with_partners(self, probs: np.ndarray, decoded: Sequence[Image.Image]) -> np.ndarray:
        """This model's calibrated probabilities of decoded images, averaged with each partner's of the same
        images (which each partner preprocesses its own way, without decoding them again)."""
        if not self.partners:
            return probs
        return np.mean([probs] + [partner._decoded_probabilities(decoded) for partner in self.partners], axis=0)

    def ood_scores(self, images: Sequence[ImageSource]) -> np.ndarray | None:
        """Distance of each image to the training X-rays (None without a fitted X-ray check)."""
        if self.ood is None:
            return None
        return self.ood.scores(self.embedder(list(images), load=self.load))

    def _xray_scores(self, images: Sequence[Image.Image], pixels: torch.Tensor) -> np.ndarray | None:
        """X-ray-check distances of decoded images; the classifier's preprocessed ``pixels`` serve
        the embedder too when both preprocess alike, so nothing is preprocessed twice."""
        if self.ood is None:
            return None
        return self.ood.scores(self.embedder.embed(pixels.cpu()) if self._shared_input else self.embedder(list(images), load=self.load))

    @torch.inference_mode()
    def predictions(self, images: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction]:
        """Decode, preprocess and classify each batch once; the X-ray check reuses the same input."""
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            decoded = [self.load(image) for image in images[start : start + batch_size]]
            pixels = self._batch(decoded)
            probs = self._with_partners(self._softmax(self._logits_of(pixels).cpu().numpy()), decoded)
            scores = self._xray_scores(decoded, pixels)
            results += [self.to_prediction(p, None if scores is None else scores[i]) for i, p in enumerate(probs)]
        return results

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

    def analyse(self, source: ImageSource, heatmap: bool = True, label: str | None = None) -> Analysis:
        """Decode once, classify, and (``heatmap``) say where the model looked, all from one forward pass.

        The heat map is for ``label``, else for the predicted class. For a pooled linear head it is
        CAM, computed from the forward pass's own feature map (equal to Grad-CAM for such heads);
        other heads get Grad-CAM, a PyTorch forward and backward (which, on the PyTorch backend,
        is also the forward that classifies).
        """
        image = self.load(source)
        pixels = self._batch([image])
        # Started first, the X-ray check runs while the classifier does.
        pending = self._xray_worker.submit(self._xray_scores, [image], pixels) if self._xray_worker else None
        cam = target = None
        if heatmap and self.cam_weights is not None:
            logits, features = self.forward_with_features(pixels)
        elif heatmap and self.onnx is None:
            logits, features, target, cam = self._grad_cam(pixels, label)
        else:
            with torch.inference_mode():
                logits = self.forward(pixels)
        with torch.inference_mode():
            if self.tta:
                logits = (logits + self.forward(pixels.flip(-1))) / 2
            scores = pending.result() if pending else self._xray_scores([image], pixels)
        probs = self._with_partners(self._softmax(logits.detach().cpu().numpy()), [image])[0]
        prediction = self.to_prediction(probs, None if scores is None else scores[0])
        if heatmap:
            wanted = self.labels.index(label) if label else int(probs.argmax())
            if self.cam_weights is not None:
                cam = class_activation_map(features[0].cpu().numpy(), self.cam_weights[wanted])
            elif cam is None or target != wanted:  # ONNX backend, other head; or partners/mirror chose another class
                cam = self._grad_cam(pixels, self.labels[wanted])[3]
            target, cam = wanted, upsample(cam, pixels.shape[-2:])
        return Analysis(prediction, self.view(pixels[0]), cam, None if cam is None else self.labels[target])

    def grad_cam(self, source: ImageSource, label: str | None = None) -> tuple[Image.Image, np.ndarray]:
        """Classic Grad-CAM (forward + backward) on the last feature map: (model's view, heat map 0..1).

        For a pooled linear head it equals ``analyse``'s CAM; kept as the reference and for other heads.
        """
        pixels = self._batch([self.load(source)])
        *_, cam = self._grad_cam(pixels, label)
        return self.view(pixels[0]), upsample(cam, pixels.shape[-2:])

    def _grad_cam(self, pixels: torch.Tensor, label: str | None) -> tuple[torch.Tensor, torch.Tensor, int, np.ndarray]:
        """(logits, features, target class, unnormalised Grad-CAM at feature resolution): ``heatmaps.grad_cam``."""
        return grad_cam(self.model, pixels, self.labels.index(label) if label else None)

    def view(self, pixels: torch.Tensor) -> Image.Image:
        """The preprocessed (3, H, W) tensor as the picture the model saw."""
        mean, std = np.asarray(self.preprocess.mean, dtype=np.float32), np.asarray(self.preprocess.std, dtype=np.float32)
        rgb = np.clip(pixels.detach().cpu().numpy().transpose(1, 2, 0) * std + mean, 0, 1)
        return Image.fromarray((rgb * 255).astype(np.uint8))


class Ensemble:
    """Mean of the calibrated probabilities of several checkpoints (fold models, distillation teachers)."""

    def __init__(self, folders: Sequence[str | os.PathLike], device: str | None = "cpu") -> None:
        if not folders:
            raise ValueError("an ensemble needs at least one checkpoint folder")
        # Members only classify: no X-ray check (and so no embedder) each.
        self.members = [Predictor.from_checkpoint(folder, device=device, backend="auto", ood=None) for folder in folders]
        self.labels = self.members[0].labels
        if any(member.labels != self.labels for member in self.members):
            raise ValueError(f"ensemble members must share one label list: {[str(f) for f in folders]}")

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        return np.mean([member.probabilities(images, batch_size) for member in self.members], axis=0)
