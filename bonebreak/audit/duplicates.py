"""Find exact and near-duplicate images of a dataset and join them into groups.

The published Train/Test split of the Roboflow export contains flipped, rotated, resized,
re-encoded, lightly cropped and "Inked" (annotated) copies of the same radiograph, inside
Train and across Train/Test. Two independent signals decide whether two files show the
same picture:

* a 64-bit DCT perceptual hash taken over all 8 flips/90-degree rotations (and over the
  central 80% of the image), compared by Hamming distance: blind to flips, rotations,
  resizing, re-encoding and thin drawn lines, but not to crops;
* the cosine similarity of EfficientNet-Lite0 ImageNet embeddings of the grey, square-padded
  image: it catches cropped, zoomed and tinted copies, which move many hash bits.

Near-duplicate pairs are joined into groups (connected components); ``bonebreak.data.splits``
keeps every group on one side of every split. Thresholds are explained with measured
distances in docs/audit.md.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm.auto import tqdm

from ..common.files import file_sha256
from ..data.decode import ImageLoadError, load_image
from ..data.preprocess import preprocess
from ..data.splits import Sample
from ..models.embedder import embed_pixels, imagenet_embedder

logger = logging.getLogger(__name__)


HASH_SIZE = 8  # 8x8 low-frequency DCT block -> 64 bits


HASH_INPUT = 32  # side of the grey thumbnail the DCT runs on


CENTRE_CROP = 0.8  # the second hash variant sees only the central 80%


DEFAULT_HASH_THRESHOLD = 6  # measured on the real data: docs/audit.md


DEFAULT_COSINE_THRESHOLD = 0.88


def grey_thumbnail(image: Image.Image, crop: float = 1.0, size: int = HASH_INPUT) -> np.ndarray:
    """The central ``crop`` share of the image as a ``size`` x ``size`` float grey array.

    Squashing to a square (instead of keeping the aspect ratio) makes a 90-degree rotation
    of the file exactly a rotation of the thumbnail, whatever the image's shape.
    """
    grey = image.convert("L")
    if crop < 1.0:
        w, h = grey.size
        dx, dy = w * (1 - crop) / 2, h * (1 - crop) / 2
        grey = grey.crop((round(dx), round(dy), round(w - dx), round(h - dy)))
    return np.asarray(grey.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)


def dihedral(array: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/90-degree rotations of a square array; index 0 is the array itself."""
    rotations = [np.rot90(array, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def phash_bits(thumbnail: np.ndarray, hash_size: int = HASH_SIZE) -> np.ndarray:
    """64 bits: which low DCT frequencies exceed their median (the classic pHash)."""
    low = dctn(thumbnail, norm="ortho")[:hash_size, :hash_size]
    return (low > np.median(low)).reshape(-1)


def image_hashes(image: Image.Image) -> np.ndarray:
    """Bool array (2 variants: full, centre, 8 transforms, 64 bits) of one image."""
    return np.stack(
        [np.stack([phash_bits(t) for t in dihedral(grey_thumbnail(image, crop))]) for crop in (1.0, CENTRE_CROP)]
    )


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between the rows of two bool matrices, via two matrix products."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.rint(a @ (1 - b).T + (1 - a) @ b.T).astype(np.int16)


def hash_distance_matrix(hashes: np.ndarray) -> np.ndarray:
    """(N, N) int matrix: min over variants and the 8 transforms of image i vs image j as stored.

    ``hashes`` has shape (N, variants, 8, 64). Taking the smaller of d(i, j) and d(j, i)
    makes the result symmetric although a median-threshold hash is not exactly equivariant.
    """
    n, variants, transforms, bits = hashes.shape
    best = np.full((n, n), bits, dtype=np.int16)
    for v in range(variants):
        d = _hamming(hashes[:, v].reshape(n * transforms, bits), hashes[:, v, 0])
        best = np.minimum(best, d.reshape(n, transforms, n).min(axis=1))
    return np.minimum(best, best.T)


def hash_distance(image_a: Image.Image, image_b: Image.Image) -> int:
    """Flip/rotation-invariant pHash distance between two images in bits (0 = same picture)."""
    return int(hash_distance_matrix(np.stack([image_hashes(image_a), image_hashes(image_b)]))[0, 1])


def embedding_input(image: Image.Image) -> Image.Image:
    """Grey, padded with black to a square: the whole radiograph is seen and drawn-on colour counts for little."""
    grey = image.convert("L")
    side = max(grey.size)
    square = Image.new("L", (side, side), 0)
    square.paste(grey, ((side - grey.width) // 2, (side - grey.height) // 2))
    return square.convert("RGB")


@dataclass
class Features:
    samples: list[Sample]  # readable samples, in the order of the arrays below
    exact: list[str]
    hashes: np.ndarray  # (N, 2, 8, 64) bool
    embeddings: np.ndarray | None  # (N, D) float32, unit length
    broken: list[tuple[str, str]]


def extract_features(samples: Sequence[Sample], embed: bool = True, batch_size: int = 32) -> Features:
    """Decode each file once; hash it and (optionally) embed it in batches."""
    import torch

    model, cfg = imagenet_embedder() if embed else (None, None)
    kept: list[Sample] = []
    exact: list[str] = []
    hashes: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    pending: list[Any] = []
    broken: list[tuple[str, str]] = []
    for sample in tqdm(samples, desc="Hashing and embedding" if embed else "Hashing", unit="img"):
        try:
            image = load_image(sample.path)
        except ImageLoadError as error:
            logger.warning("skipping unreadable image %s", error)
            broken.append((str(sample.path), str(error)))
            continue
        kept.append(sample)
        exact.append(file_sha256(sample.path))
        hashes.append(image_hashes(image))
        if cfg is not None:
            pending.append(torch.from_numpy(preprocess(embedding_input(image), cfg)))
            if len(pending) == batch_size:
                chunks.append(embed_pixels(model, torch.stack(pending)))
                pending = []
    if cfg is not None and pending:
        chunks.append(embed_pixels(model, torch.stack(pending)))
    embeddings = np.concatenate(chunks) if chunks else (np.zeros((0, 1)) if embed else None)
    hash_array = np.stack(hashes) if hashes else np.zeros((0, 2, 8, 64), dtype=bool)
    return Features(kept, exact, hash_array, embeddings, broken)


def cosine_matrix(embeddings: np.ndarray | None, n: int) -> np.ndarray:
    """Pairwise cosine of unit vectors; NaN everywhere when embeddings were not computed."""
    if embeddings is None:
        return np.full((n, n), np.nan, dtype=np.float32)
    return (embeddings @ embeddings.T).astype(np.float32)


def near_duplicate_pairs(
    hash_d: np.ndarray, cosine: np.ndarray, exact: Sequence[str], hash_threshold: int, cosine_threshold: float
) -> list[tuple[int, int, str]]:
    """(i, j, kind) for i < j, kind 'exact', 'hash+embedding', 'hash' or 'embedding'."""
    n = len(exact)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    by_hash = hash_d <= hash_threshold
    by_cos = np.nan_to_num(cosine, nan=-np.inf) >= cosine_threshold
    exact_arr = np.asarray(exact)
    same_bytes = exact_arr[:, None] == exact_arr[None, :]
    pairs = []
    for i, j in zip(*np.nonzero(upper & (by_hash | by_cos | same_bytes))):
        if same_bytes[i, j]:
            kind = "exact"
        elif by_hash[i, j] and by_cos[i, j]:
            kind = "hash+embedding"
        else:
            kind = "hash" if by_hash[i, j] else "embedding"
        pairs.append((int(i), int(j), kind))
    return pairs


def connected_groups(n: int, pairs: Iterable[tuple[int, ...]]) -> list[list[int]]:
    """Union-find over index pairs; returns every component (singletons too), sorted by first index."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    return sorted(members.values(), key=lambda g: g[0])


def exact_groups(exact: Sequence[str]) -> list[list[int]]:
    """Groups (size >= 2) of byte-identical files."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(exact):
        by_digest[digest].append(i)
    return [g for g in by_digest.values() if len(g) > 1]


def is_leak(group: Sequence[int], samples: Sequence[Sample]) -> bool:
    return {samples[i].split for i in group} >= {"train", "test"}


def is_conflict(group: Sequence[int], samples: Sequence[Sample]) -> bool:
    return len({samples[i].label for i in group}) > 1


def duplicate_counts(
    samples: Sequence[Sample], groups: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, str]], exact: Sequence[str]
) -> dict[str, Any]:
    """The headline counts a person needs to judge the dataset."""
    dup_groups = [g for g in groups if len(g) > 1]
    leaks = [g for g in dup_groups if is_leak(g, samples)]
    leaked_test = sorted(i for g in leaks for i in g if samples[i].split == "test")
    splits = Counter(s.split for s in samples)
    within = {
        split: [g for g in dup_groups if sum(samples[i].split == split for i in g) > 1] for split in sorted(splits)
    }
    pair_splits = Counter("/".join(sorted((samples[i].split, samples[j].split))) for i, j, _ in pairs)
    return {
        "images": len(samples),
        "images_per_split": dict(sorted(splits.items())),
        "exact_duplicate_groups": len(exact_groups(exact)),
        "exact_duplicate_files_redundant": sum(len(g) - 1 for g in exact_groups(exact)),
        "near_duplicate_pairs": len(pairs),
        "near_duplicate_pairs_by_kind": dict(sorted(Counter(k for *_, k in pairs).items())),
        "near_duplicate_pairs_by_splits": dict(sorted(pair_splits.items())),
        "duplicate_groups": len(dup_groups),
        "images_in_duplicate_groups": sum(len(g) for g in dup_groups),
        "largest_group": max((len(g) for g in dup_groups), default=1),
        "groups_with_copies_within_split": {split: len(gs) for split, gs in within.items()},
        "redundant_images_within_split": {
            split: sum(sum(samples[i].split == split for i in g) - 1 for g in gs) for split, gs in within.items()
        },
        "train_test_groups": len(leaks),
        "test_images_with_copy_in_train": len(leaked_test),
        "test_images_clean": splits.get("test", 0) - len(leaked_test),
        "conflicting_label_groups": sum(is_conflict(g, samples) for g in dup_groups),
    }


@dataclass
class Duplicates:
    features: Features
    hash_d: np.ndarray
    cosine: np.ndarray
    pairs: list[tuple[int, int, str]]
    groups: list[list[int]]


def find_duplicates(features: Features, hash_threshold: int, cosine_threshold: float) -> Duplicates:
    n = len(features.samples)
    hash_d = hash_distance_matrix(features.hashes)
    cosine = cosine_matrix(features.embeddings, n)
    pairs = near_duplicate_pairs(hash_d, cosine, features.exact, hash_threshold, cosine_threshold)
    return Duplicates(features, hash_d, cosine, pairs, connected_groups(n, pairs))
