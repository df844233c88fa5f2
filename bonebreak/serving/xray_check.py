"""The X-ray check: "is this a bone X-ray at all?"

An image's generic ImageNet embedding (EfficientNet-Lite0, its own network in ``xray_check.onnx``) is compared
with those of the training X-rays: the score is the mean cosine distance to the k = 5 nearest, and the
threshold is the 99th percentile of validation distances, so about 1% of genuine X-rays are flagged. The
reference embeddings and the threshold are ``xray_check.safetensors``; training fits both
(``bonebreak.evaluation.calibration``). Generic features are used on purpose: measured on clean Test, the
classifier's own features separated photos from X-rays worse (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ..common.checkpoint_format import EMBEDDING, EXPORT_COMMAND, XRAY_CHECK_FILE, XRAY_CHECK_ONNX, ModelLoadError
from ..data.decode import ImageSource, load_image
from ..data.preprocess import PreprocessConfig, preprocess_batch
from .onnx_runtime import PREPROCESS_KEY, OnnxForward

QUANTILE = 0.99
NEIGHBOURS = 5
EMBEDDING_NAME = "imagenet_lite0_74"  # what the reference embeddings were computed with: xray_check.onnx's network
LEGACY_FILE = "ood.safetensors"  # the same data under its name before 0.6
# A network this small runs faster on one ONNX Runtime thread than on two (1.8 vs 2.2 ms per image on a 2-core CPU),
# and the classifier keeps both cores.
THREADS = 1


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


class XrayEmbedder:
    """The X-ray check's network on ONNX Runtime, with the preprocessing its input expects (from the file's metadata)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.network = OnnxForward(path, threads=THREADS)
        try:
            self.preprocess = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in json.loads(self.network.metadata[PREPROCESS_KEY]).items()})
        except (KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(f"{path} does not say how its input is preprocessed: run `{EXPORT_COMMAND.format(Path(path).parent)}`") from error

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Unit-length embeddings of a batch already preprocessed with ``self.preprocess``."""
        return unit_rows(self.network(pixels)[EMBEDDING])

    def __call__(self, images: Sequence[ImageSource], batch_size: int = 32, load: Callable[[ImageSource], Image.Image] = load_image) -> np.ndarray:
        """Unit-length embeddings of images or paths, each decoded by ``load`` a batch at a time."""
        chunks = [self.embed_pixels(preprocess_batch([load(image) for image in images[start : start + batch_size]], self.preprocess))
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)


@dataclass
class XrayCheck:
    """Mean cosine distance to the k nearest training X-rays in ImageNet feature space, and its threshold."""

    reference: np.ndarray  # (n, d), unit rows
    threshold: float
    k: int = NEIGHBOURS
    embedder: XrayEmbedder | None = field(default=None, repr=False)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        similarity = unit_rows(embeddings) @ self.reference.T
        k = min(self.k, similarity.shape[1])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k:].mean(axis=1)  # the k most similar, unordered

    def passes(self, distance: float) -> bool:
        return bool(distance <= self.threshold)

    @classmethod
    def fit(cls, train_embeddings: np.ndarray, validation_embeddings: np.ndarray, quantile: float = QUANTILE,
            k: int = NEIGHBOURS, embedder: XrayEmbedder | None = None) -> "XrayCheck":
        check = cls(unit_rows(train_embeddings), threshold=0.0, k=k, embedder=embedder)
        check.threshold = float(np.quantile(check.distances(validation_embeddings), quantile))
        return check

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / XRAY_CHECK_FILE
        save_file({"train_embeddings": self.reference.astype(np.float16)}, str(path),
                  metadata={"threshold": repr(self.threshold), "k": str(self.k), "quantile": repr(QUANTILE), "embedding": EMBEDDING_NAME})
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "XrayCheck | None":
        """The folder's X-ray check, None when it has none; an error naming the fix when it is incomplete or of an older kind."""
        folder = Path(folder)
        path = folder / XRAY_CHECK_FILE
        fix = f"run `{EXPORT_COMMAND.format(folder)}`"
        if not path.is_file():
            if (folder / LEGACY_FILE).is_file():
                raise ModelLoadError(f"{folder}: its X-ray check is in the older {LEGACY_FILE}: {fix} to bring the folder up to date")
            return None
        with safe_open(str(path), "np") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("embedding") != EMBEDDING_NAME:
            raise ModelLoadError(f"{path} was fitted on the embedding {metadata.get('embedding')!r}, not {EMBEDDING_NAME}: "
                                 f"refit it with `bonebreak calibrate --model_path {folder}`")
        if not (folder / XRAY_CHECK_ONNX).is_file():
            raise ModelLoadError(f"{folder}: {XRAY_CHECK_ONNX}, the X-ray check's network, is missing: {fix}")
        # stored unit-length at fit time (in float16): used as stored, as they were measured
        return cls(load_file(str(path))["train_embeddings"].astype(np.float32), float(metadata["threshold"]), int(metadata.get("k", NEIGHBOURS)),
                   XrayEmbedder(folder / XRAY_CHECK_ONNX))


def adopt_legacy_file(folder: str | os.PathLike) -> bool:
    """Rename a checkpoint's ``ood.safetensors`` (before 0.6) to ``xray_check.safetensors``: the same references, threshold
    and metadata. True when renamed; an error naming the fix when it was fitted on an embedding serving no longer has."""
    folder = Path(folder)
    legacy, path = folder / LEGACY_FILE, folder / XRAY_CHECK_FILE
    if not legacy.is_file() or path.is_file():
        return False
    with safe_open(str(legacy), "np") as handle:
        embedding = (handle.metadata() or {}).get("embedding")
    if embedding != EMBEDDING_NAME:
        raise ModelLoadError(f"{legacy} was fitted on the embedding {embedding!r}, not {EMBEDDING_NAME}: refit the X-ray check "
                             f"with `bonebreak calibrate --model_path {folder}`")
    os.replace(legacy, path)
    return True
