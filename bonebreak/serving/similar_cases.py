"""Similar cases: the labelled training X-rays nearest to an upload in the classifier's own pooled features (the
``embedding`` output of the forward pass that classifies it, so no second network runs per request).

The index, ``similar_cases.safetensors`` in the checkpoint folder, holds unit-length float16 features, each case's
class, a small JPEG thumbnail, and two marks that are shown, not hidden: the label audit flagged the case's label,
or the case has a near-duplicate among the cases. It is stamped with the weights its features came from (features
from other weights would be meaningless) and carries the dataset's credit. Because it holds thumbnails of training
images it is written only for data whose license allows it (``bonebreak train --similar_cases``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..common.checkpoint_format import EXPORT_COMMAND, SIMILAR_CASES_FILE, ModelLoadError

DEFAULT_CASES = 6  # thumbnails shown beside an answer
THUMBNAIL_SIZE = 112  # longest side, pixels: readable in a gallery cell, about 3 KB as JPEG


@dataclass(frozen=True)
class Case:
    """One training X-ray shown beside an answer."""

    name: str  # file name in the dataset
    label: str
    similarity: float  # cosine similarity of the pooled features, -1..1
    thumbnail: bytes  # JPEG
    flagged: bool  # the label audit suspects its label
    near_duplicate: bool  # another case is a near-copy of it

    def caption(self) -> str:
        """What a gallery cell says under the thumbnail: the dataset's label, the similarity and the marks."""
        marks = [mark for mark, on in (("label doubted", self.flagged), ("has a near-copy", self.near_duplicate)) if on]
        return f"{self.label}, similarity {self.similarity:.2f}" + "".join(f" · {mark}" for mark in marks)


def unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def thumbnail_jpeg(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    small = image.convert("RGB")
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@dataclass
class CaseIndex:
    """The cases of one checkpoint: features (N, D) unit-length, class index per case, names, thumbnails, marks."""

    features: np.ndarray
    targets: np.ndarray
    labels: list[str]
    names: list[str]
    thumbnails: list[bytes]
    flagged: np.ndarray
    groups: np.ndarray  # near-duplicate group id per case, -1 for none
    credit: str
    weights_stamp: str | None = None

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.targets) == len(self.names) == len(self.thumbnails) == len(self.flagged) == len(self.groups) == n):
            raise ValueError("a similar-cases index needs one target, name, thumbnail, mark and group per feature row")
        self.features = unit_rows(self.features)
        ids, counts = np.unique(self.groups[self.groups >= 0], return_counts=True)
        self.near_duplicate = np.isin(self.groups, ids[counts > 1])

    def similarities(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine similarity of each embedding (n, D) to every case (n, N)."""
        return unit_rows(np.atleast_2d(embeddings)) @ self.features.T

    def nearest(self, embedding: np.ndarray, k: int = DEFAULT_CASES) -> list[Case]:
        """The ``k`` most similar cases, most similar first (ties by index, so the answer is repeatable)."""
        similarity = self.similarities(embedding)[0]
        order = np.argsort(-similarity, kind="stable")[:k]
        return [Case(self.names[i], self.labels[self.targets[i]], float(similarity[i]), self.thumbnails[i], bool(self.flagged[i]),
                     bool(self.near_duplicate[i])) for i in order]

    def vote(self, embeddings: np.ndarray, k: int = DEFAULT_CASES) -> np.ndarray:
        """A plain k-nearest-neighbour vote (n, n_labels): the share of each class among the ``k`` nearest cases; a tie
        goes to the class with the nearer case (a nudge of under 1/k, so it never outweighs a vote)."""
        nearest = np.argsort(-self.similarities(embeddings), axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(nearest), len(self.labels)), np.float64)
        nudge = (k - np.arange(k)) / (k * k * (k + 1))  # sums to < 1/k over all k ranks
        for row, cases in enumerate(nearest):
            np.add.at(votes[row], self.targets[cases], 1.0 / k + nudge[: len(cases)])
        return votes

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        offsets = np.cumsum([0] + [len(t) for t in self.thumbnails]).astype(np.int64)
        tensors = {"features": self.features.astype(np.float16), "targets": self.targets.astype(np.int32),
                   "flagged": self.flagged.astype(np.uint8), "groups": self.groups.astype(np.int32), "offsets": offsets,
                   "thumbnails": np.frombuffer(b"".join(self.thumbnails), dtype=np.uint8)}
        metadata = {"labels": json.dumps(self.labels), "names": json.dumps(self.names), "credit": self.credit,
                    "weights_sha256": self.weights_stamp or ""}
        path = Path(folder) / SIMILAR_CASES_FILE
        partial = path.with_name(f".{path.name}.part")
        save_file(tensors, str(partial), metadata=metadata)
        partial.chmod(0o644)  # a file of the checkpoint like the others, not private to whoever built it
        os.replace(partial, path)  # a reader sees the old index or the new one
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, weights_stamp: str | None = None) -> "CaseIndex | None":
        """The folder's index, None when it has none; an error naming the fix when it came from other weights."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(folder) / SIMILAR_CASES_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "np") as handle:
            metadata = handle.metadata() or {}
        if weights_stamp is not None and metadata.get("weights_sha256") != weights_stamp:
            raise ModelLoadError(f"{path} was built from other weights than the folder's model: rebuild it with "
                                 f"`{EXPORT_COMMAND.format(folder)} --similar_cases`")
        tensors = load_file(str(path))
        blob, offsets = tensors["thumbnails"].tobytes(), tensors["offsets"]
        return cls(tensors["features"].astype(np.float32), tensors["targets"].astype(np.int64), json.loads(metadata["labels"]),
                   json.loads(metadata["names"]), [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)],
                   tensors["flagged"].astype(bool), tensors["groups"].astype(np.int64), metadata.get("credit", ""),
                   metadata.get("weights_sha256") or None)


def build_index(embed: Callable[[Sequence[str]], np.ndarray], load: Callable[[str], Image.Image], paths: Sequence[str],
                targets: Sequence[int], labels: list[str], credit: str, flagged: Sequence[bool] | None = None,
                groups: Sequence[int] | None = None, weights_stamp: str | None = None, batch_size: int = 32) -> CaseIndex:
    """An index of ``paths`` (training images with class indices ``targets``): ``embed`` gives the classifier's pooled
    features of a batch of paths, ``load`` decodes one for its thumbnail."""
    features = [embed(paths[start:start + batch_size]) for start in range(0, len(paths), batch_size)]
    n = len(paths)
    return CaseIndex(np.concatenate(features) if features else np.zeros((0, 1), np.float32), np.asarray(targets, np.int64), list(labels),
                     [Path(p).name for p in paths], [thumbnail_jpeg(load(p)) for p in paths],
                     np.asarray(flagged if flagged is not None else [False] * n, bool),
                     np.asarray(groups if groups is not None else [-1] * n, np.int64), credit, weights_stamp)
