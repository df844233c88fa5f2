"""The "is this a bone X-ray at all?" check.

Mean cosine distance from an image's generic ImageNet embedding to its 5 nearest training
X-rays. The threshold is the 99th percentile of validation distances, so about 1% of genuine
X-rays are flagged. Stored in a checkpoint as ``ood.safetensors``, which names the embedding it
was fitted on (``EMBEDDINGS``; files without the name are the older mirror-averaged kind);
fitted by ``bonebreak.calibration.fit_calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torch.nn.functional as F

from .images import load_image
from .models import PooledFeatures, embed_pixels, imagenet_embedder
from .onnx_backend import onnx_features

OOD_FILE = "ood.safetensors"
OOD_QUANTILE = 0.99
PHOTOS_DIR = Path(__file__).resolve().parent / "assets" / "photos"  # reference non-X-ray pictures


@dataclass(frozen=True)
class Embedding:
    """How the X-ray check embeds a picture: generic ImageNet EfficientNet-Lite0 features of the
    no-crop 224 px input, optionally average-pooled down first and/or averaged with the mirror image."""

    name: str
    mirror: bool  # average with the mirror image's features: a second forward pass
    downscale: int = 1  # the 224 px input average-pooled by this factor before the network
    description: str = ""


EMBEDDINGS = {e.name: e for e in (
    Embedding("imagenet_lite0_mirror", True, 1, "efficientnet_lite0 ImageNet, no crop, mirror-averaged"),
    Embedding("imagenet_lite0", False, 1, "efficientnet_lite0 ImageNet, no crop, one forward"),
    Embedding("imagenet_lite0_112", False, 2, "efficientnet_lite0 ImageNet, no crop, 224 px input average-pooled to 112 px, one forward"),
    Embedding("imagenet_lite0_74", False, 3, "efficientnet_lite0 ImageNet, no crop, 224 px input average-pooled to 74 px, one forward"),
)}
LEGACY_EMBEDDING = "imagenet_lite0_mirror"  # ood.safetensors files written before the embedding was recorded
DEFAULT_EMBEDDING = "imagenet_lite0_74"  # what training fits now (measurements: README, "The shipped model")
# A network this small runs faster on one ONNX Runtime thread than on two (74 px: 1.8 vs 2.2 ms per
# image, 2-core CPU), and the classifier keeps both cores.
EMBEDDER_THREADS = 1


def normalise(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


class ImageEmbedder:
    """Generic ImageNet features (EfficientNet-Lite0, offline weights) for the X-ray check.

    Fine-tuned features are not used on purpose: measured on clean Test, the classifier's own
    pooled features at any depth separated photos from X-rays worse (AUROC 0.95 for the last
    feature map, at most 0.96 for average-pooled maps of several depths) than generic ImageNet
    features (1.00); see README, "The shipped model".
    """

    def __init__(self, onnx: bool = False, embedding: str = DEFAULT_EMBEDDING) -> None:
        self.embedding = EMBEDDINGS[embedding]
        self.model, self.transform = imagenet_embedder()
        self.features = None  # PyTorch forward
        if onnx:  # about 4x faster per image on a 2-core CPU; the exported graph is checked against PyTorch
            size = int(self.transform(Image.new("RGB", (8, 8))).shape[-1]) // self.embedding.downscale
            self.features = onnx_features(self.model, size, threads=EMBEDDER_THREADS)

    def __call__(self, images: Sequence[Any], batch_size: int = 32, load: Callable[[Any], Image.Image] = load_image) -> np.ndarray:
        """L2-normalised embeddings of images or paths; ``load`` decodes each (the Predictor passes
        its own, which hands back an image it has already decoded as it is)."""
        chunks = [self.embed(torch.stack([self.transform(load(image)) for image in images[start : start + batch_size]]))
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 1280), dtype=np.float32)

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """Embeddings of a batch already preprocessed with ``self.transform``."""
        if self.embedding.downscale > 1:
            pixels = F.avg_pool2d(pixels, self.embedding.downscale)
        if self.embedding.mirror:
            return embed_pixels(self.model, pixels, self.features)
        with torch.inference_mode():
            return F.normalize((self.features or PooledFeatures(self.model))(pixels), dim=1).numpy()


@dataclass
class OODDetector:
    """Mean cosine distance to the k nearest training X-rays in ImageNet feature space."""

    train_embeddings: np.ndarray  # (n, d), L2-normalised
    threshold: float
    k: int = 5
    embedding: str = DEFAULT_EMBEDDING  # a key of EMBEDDINGS: what ``scores`` must be given

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        similarity = normalise(embeddings) @ self.train_embeddings.T
        k = min(self.k, similarity.shape[1])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k:].mean(axis=1)  # the k most similar, unordered

    @classmethod
    def fit(cls, train_embeddings: np.ndarray, validation_embeddings: np.ndarray, quantile: float = OOD_QUANTILE, k: int = 5,
            embedding: str = DEFAULT_EMBEDDING) -> "OODDetector":
        detector = cls(normalise(train_embeddings), threshold=0.0, k=k, embedding=embedding)
        detector.threshold = float(np.quantile(detector.scores(validation_embeddings), quantile))
        return detector

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / OOD_FILE
        save_file({"train_embeddings": torch.from_numpy(self.train_embeddings.astype(np.float16))}, str(path),
                  metadata={"threshold": repr(self.threshold), "k": str(self.k), "quantile": repr(OOD_QUANTILE),
                            "embedding": self.embedding, "features": EMBEDDINGS[self.embedding].description})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "OODDetector | None":
        path = Path(folder) / OOD_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        embedding = metadata.get("embedding", LEGACY_EMBEDDING)
        if embedding not in EMBEDDINGS:
            raise ValueError(f"{path} was fitted on an embedding this version does not know ({embedding!r}): "
                             "refit it with `python -m bonebreak.calibrate`")
        return cls(load_file(str(path))["train_embeddings"].float().numpy(), float(metadata["threshold"]), int(metadata.get("k", 1)),
                   embedding)


def auroc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(score of an outlier > score of an X-ray), ties counted half."""
    from sklearn.metrics import roc_auc_score  # lazy: scikit-learn is heavy and only evaluation needs this

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return float(roc_auc_score(y, np.r_[positive_scores, negative_scores]))


def natural_photos() -> list[tuple[str, Image.Image]]:
    """Pictures that are not X-rays, shipped in ``bonebreak/assets/photos`` (name = file stem).

    Public-domain/CC0 photos and a few generated pictures (sources and licences in that
    folder's ATTRIBUTION.md); they need no download and no package beyond Pillow.
    """
    photos = []
    for path in sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with Image.open(path) as image:
            image.load()
            photos.append((path.stem, image))
    if not photos:
        raise FileNotFoundError(f"no reference photos in {PHOTOS_DIR}")
    return photos
