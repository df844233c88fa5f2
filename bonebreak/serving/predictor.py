"""One checkpoint's request path: the app, prediction, evaluation and the tests all classify through ``Predictor``.

``predict(image)`` decodes, preprocesses, runs the network and returns calibrated probabilities per label;
``analyse(image)`` also returns where the model looked, from the same forward pass, with the X-ray check run
beside it. The network is any ``Forward``: ONNX Runtime (``onnx_runtime``) or PyTorch
(``bonebreak.models.torch_backend``); decoding and preprocessing are the same code either way. Every method
accepts an image that ``Predictor.load`` already decoded and does not decode it again.
"""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..common.checkpoint_format import CLASS_MAPS, EMBEDDING, LOGITS
from ..data.decode import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image
from ..data.preprocess import PreprocessConfig, model_view, preprocess_batch
from .heatmaps import class_activation_map, upsample
from .similar_cases import CaseIndex
from .xray_check import XrayCheck

DEFAULT_UNSURE_BELOW = 0.5


class Forward(Protocol):
    """A network on some engine: a preprocessed float32 batch in, its outputs by name out (``logits`` always;
    ``embedding`` and ``class_maps`` where the network has them). ``description`` names the engine for logs."""

    description: str

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]: ...


class GradCam(Protocol):
    """Grad-CAM of the first image of a batch for one class, at feature resolution (a PyTorch backend offers it)."""

    def __call__(self, pixels: np.ndarray, target: int) -> np.ndarray: ...


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature``, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    """Probabilities for every label, highest first, and the X-ray check's verdict."""

    probabilities: dict[str, float]
    unsure_below: float = DEFAULT_UNSURE_BELOW
    xray_distance: float | None = None  # distance to the nearest training X-rays (None: the checkpoint has no X-ray check)
    xray_threshold: float | None = None
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # the head's input, for similar cases
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
    def xray_check_passed(self) -> bool | None:
        """False when the image is unlike every training X-ray (photo, screenshot, other scan); None without a check."""
        if self.xray_distance is None or self.xray_threshold is None:
            return None
        return self.xray_distance <= self.xray_threshold

    def top(self, k: int = 3) -> dict[str, float]:
        return dict(list(self.probabilities.items())[:k])


@dataclass(frozen=True)
class Analysis:
    """One image, one forward pass: the prediction and, when asked for, where the model looked."""

    prediction: Prediction
    view: Image.Image  # the picture the model saw (resized, cropped; normalisation undone)
    heatmap: np.ndarray | None = None  # 0..1, the view's size; None when not asked for or not available
    heatmap_label: str | None = None  # the class the heat map is for


class Predictor:
    """A loaded classifier, the preprocessing it was trained with, its temperature and its X-ray check."""

    def __init__(self, labels: Sequence[str], preprocess: PreprocessConfig, forward: Forward, *, temperature: float = 1.0,
                 xray_check: XrayCheck | None = None, grad_cam: GradCam | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
                 unsure_below: float = DEFAULT_UNSURE_BELOW, similar_cases: CaseIndex | None = None) -> None:
        if not 0.0 <= unsure_below <= 1.0:
            raise ValueError(f"--unsure_below must be between 0 and 1, got {unsure_below}")
        if temperature <= 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        self.labels = list(labels)
        self.preprocess = preprocess
        self.forward = forward
        self.temperature = temperature
        self.xray_check = xray_check
        self.grad_cam = grad_cam  # heat maps for heads whose network returns no class maps (None: not available)
        self.limits = limits
        self.unsure_below = unsure_below
        self.similar_cases = similar_cases  # labelled training X-rays to show beside an answer (None: the folder has none)
        # The classifier's input serves the X-ray check too when both preprocess alike (the shipped model does).
        self.shared_input = xray_check is not None and xray_check.embedder is not None and xray_check.embedder.preprocess == preprocess
        # analyse() runs the X-ray check's network beside the classifier's (ONNX Runtime releases the GIL): 16 ms a
        # request instead of 19.5 on a 2-core CPU. The pool starts its thread on the first request.
        self._xray_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonebreak-xray-check") if xray_check else None
        self._decoded: weakref.WeakValueDictionary[int, Image.Image] = weakref.WeakValueDictionary()

    @property
    def description(self) -> str:
        """Which engine runs the forward pass, for logs: users should know what they are timing."""
        return f"inference backend {self.forward.description}"

    @property
    def heatmaps_available(self) -> bool:
        return self.grad_cam is not None or CLASS_MAPS in getattr(self.forward, "output_names", (CLASS_MAPS,))

    def load(self, source: ImageSource) -> Image.Image:
        """Decode with ``load_image``; an image this Predictor decoded before is handed back as it is."""
        if isinstance(source, Image.Image) and self._decoded.get(id(source)) is source:
            return source
        image = load_image(source, self.limits)
        self._decoded[id(image)] = image
        return image

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images as the preprocessed float32 batch the network takes."""
        return preprocess_batch(list(images), self.preprocess)

    def logits(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Raw logits (n_images, n_labels) for images or paths, decoded in batches."""
        chunks = [self.forward(self.pixels([self.load(image) for image in images[start : start + batch_size]]))[LOGITS]
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def embeddings(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """The classifier's pooled features (the head's input) of each image, as similar cases compare them."""
        chunks = []
        for start in range(0, len(images), batch_size):
            outputs = self.forward(self.pixels([self.load(image) for image in images[start : start + batch_size]]))
            if EMBEDDING not in outputs:
                raise ValueError(f"this model's network gives no pooled features ({self.forward.description}): no similar cases for it")
            chunks.append(np.asarray(outputs[EMBEDDING], np.float32).reshape(len(outputs[EMBEDDING]), -1))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        """Calibrated softmax probabilities (n_images, n_labels)."""
        return softmax(self.logits(images, batch_size), self.temperature)

    def xray_distances(self, images: Sequence[ImageSource], pixels: np.ndarray | None = None) -> np.ndarray | None:
        """X-ray-check distances of images (None without a check); the classifier's preprocessed ``pixels`` serve the
        check's network too when both preprocess alike, so nothing is preprocessed twice."""
        if self.xray_check is None or self.xray_check.embedder is None:
            return None
        embedder = self.xray_check.embedder
        if pixels is not None and self.shared_input:
            return self.xray_check.distances(embedder.embed_pixels(pixels))
        return self.xray_check.distances(embedder(list(images), load=self.load))

    def predictions(self, images: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction]:
        """Decode, preprocess and classify each batch once; the X-ray check reuses the same input."""
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            decoded = [self.load(image) for image in images[start : start + batch_size]]
            pixels = self.pixels(decoded)
            outputs = self.forward(pixels)
            distances = self.xray_distances(decoded, pixels)
            probs = softmax(outputs[LOGITS], self.temperature)
            results += [self.to_prediction(p, None if distances is None else distances[i], outputs.get(EMBEDDING, [None] * len(probs))[i])
                        for i, p in enumerate(probs)]
        return results

    def predict(self, source: ImageSource) -> Prediction:
        """Decode one image (path, bytes, PIL or array) and classify it."""
        return self.predictions([source])[0]

    def to_prediction(self, probs: np.ndarray, xray_distance: float | None = None, embedding: np.ndarray | None = None) -> Prediction:
        order = np.argsort(-probs, kind="stable")
        return Prediction({self.labels[i]: float(probs[i]) for i in order}, unsure_below=self.unsure_below,
                          xray_distance=None if xray_distance is None else float(xray_distance),
                          xray_threshold=self.xray_check.threshold if self.xray_check is not None else None, embedding=embedding)

    def analyse(self, source: ImageSource, heatmap: bool = True, label: str | None = None,
                others: Sequence[np.ndarray] = ()) -> Analysis:
        """Decode once, classify, and (``heatmap``) say where the model looked, all from one forward pass.

        The heat map is for ``label``, else for the predicted class. ``others``: other models' calibrated
        probabilities of the same image (an ensemble's members), averaged with this model's before the
        predicted class is chosen, so the heat map is always for the class the answer names.
        """
        image = self.load(source)
        pixels = self.pixels([image])
        # Started first, the X-ray check runs while the classifier does.
        pending = self._xray_worker.submit(self.xray_distances, [image], pixels) if self._xray_worker else None
        outputs = self.forward(pixels)
        probs = softmax(outputs[LOGITS], self.temperature)[0]
        if len(others):
            probs = np.mean([probs, *others], axis=0)
        distances = pending.result() if pending else None
        prediction = self.to_prediction(probs, None if distances is None else distances[0],
                                        outputs[EMBEDDING][0] if EMBEDDING in outputs else None)
        cam, wanted = None, self.labels.index(label) if label else int(np.argmax(probs))
        if heatmap and CLASS_MAPS in outputs:
            cam = class_activation_map(outputs[CLASS_MAPS][0, wanted])
        elif heatmap and self.grad_cam is not None:
            cam = self.grad_cam(pixels, wanted)
        heat = None if cam is None else upsample(cam, pixels.shape[-2:])
        return Analysis(prediction, model_view(pixels[0], self.preprocess), heat, None if heat is None else self.labels[wanted])
