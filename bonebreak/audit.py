"""Find exact and near-duplicate images and build leak-free splits: ``python -m bonebreak.audit``.

The published Train/Test split of the Roboflow export contains flipped, rotated, resized,
re-encoded, lightly cropped and "Inked" (annotated) copies of the same radiograph, inside
Train and across Train/Test. Two independent signals decide whether two files show the
same picture:

* a 64-bit DCT perceptual hash taken over all 8 flips/90-degree rotations (and over the
  central 80% of the image), compared by Hamming distance: blind to flips, rotations,
  resizing, re-encoding and thin drawn lines, but not to crops;
* the cosine similarity of EfficientNet-Lite0 ImageNet embeddings of the grey, square-padded
  image: it catches cropped, zoomed and tinted copies, which move many hash bits.

Near-duplicate pairs are joined into groups (connected components); every group is kept on
one side of every split. Outputs (``--out_dir``): pairs.csv, groups.json, summary.json,
contact_sheet.png; and the split manifest (``--manifest``). Thresholds are explained with
measured distances in docs/audit.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.fft import dctn
from tqdm.auto import tqdm

from .cli import parse
from .data import DatasetError, Sample, resolve_data_dir, scan_folder
from .images import ImageLoadError, load_image
from .models import embed_pixels, imagenet_embedder

logger = logging.getLogger(__name__)

HASH_SIZE = 8  # 8x8 low-frequency DCT block -> 64 bits
HASH_INPUT = 32  # side of the grey thumbnail the DCT runs on
CENTRE_CROP = 0.8  # the second hash variant sees only the central 80%
DEFAULT_HASH_THRESHOLD = 6  # measured on the real data: docs/audit.md
DEFAULT_COSINE_THRESHOLD = 0.88
DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "splits" / "bone_break_manifest.csv"
PAIR_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "split_a", "split_b", "hash_distance", "cosine", "kind"]
TRAIN, VALIDATION, CLEAN_TEST, TEST_LEAKED = "train", "validation", "clean_test", "test_leaked"


@dataclass
class AuditArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."}
    )
    out_dir: str = field(
        default="reports/audit",
        metadata={"help": "Where pairs.csv, groups.json, summary.json and contact_sheet.png are written."},
    )
    manifest: str = field(
        default=str(DEFAULT_MANIFEST),
        metadata={"help": "Split manifest CSV to write (path relative to the data root, label, split, group)."},
    )
    hash_threshold: int = field(
        default=DEFAULT_HASH_THRESHOLD,
        metadata={"help": "Pairs whose flip/rotation-invariant pHash distance (0-64 bits) is <= this are near-duplicates."},
    )
    cosine_threshold: float = field(
        default=DEFAULT_COSINE_THRESHOLD,
        metadata={"help": "Pairs whose EfficientNet-Lite0 embedding cosine is >= this are near-duplicates."},
    )
    embeddings: bool = field(
        default=True, metadata={"help": "Compute the embedding check (--embeddings false: hashes only, faster)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Images per embedding forward pass."})
    val_fraction: float = field(
        default=0.15, metadata={"help": "Share of the Train folder (whole groups, per class) held out for validation."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the grouped split; the manifest is identical for a given seed."})
    max_sheet_rows: int = field(
        default=40, metadata={"help": "Most groups drawn on contact_sheet.png (conflicts and leaks come first)."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.hash_threshold <= 64:
            raise ValueError(f"--hash_threshold must be between 0 and 64 bits, got {self.hash_threshold}")
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise ValueError(f"--cosine_threshold must be between -1 and 1, got {self.cosine_threshold}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_sheet_rows < 0:
            raise ValueError(f"--max_sheet_rows must be >= 0, got {self.max_sheet_rows}")


# --- Exact and perceptual hashes ---------------------------------------------------------------


def exact_hash(path: str | os.PathLike) -> str:
    """sha256 of the file bytes: equal only for byte-identical files."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


# --- Embeddings ---------------------------------------------------------------------------------


def embedding_input(image: Image.Image) -> Image.Image:
    """Grey, padded with black to a square: the whole radiograph is seen and drawn-on colour counts for little."""
    grey = image.convert("L")
    side = max(grey.size)
    square = Image.new("L", (side, side), 0)
    square.paste(grey, ((side - grey.width) // 2, (side - grey.height) // 2))
    return square.convert("RGB")


# --- Reading the dataset once ------------------------------------------------------------------


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

    model, transform = imagenet_embedder() if embed else (None, None)
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
        exact.append(exact_hash(sample.path))
        hashes.append(image_hashes(image))
        if transform is not None:
            pending.append(transform(embedding_input(image)))
            if len(pending) == batch_size:
                chunks.append(embed_pixels(model, torch.stack(pending)))
                pending = []
    if transform is not None and pending:
        chunks.append(embed_pixels(model, torch.stack(pending)))
    embeddings = np.concatenate(chunks) if chunks else (np.zeros((0, 1)) if embed else None)
    hash_array = np.stack(hashes) if hashes else np.zeros((0, 2, 8, 64), dtype=bool)
    return Features(kept, exact, hash_array, embeddings, broken)


# --- Pairs and groups ----------------------------------------------------------------------------


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


def summarise(
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


# --- Leak-free splits ---------------------------------------------------------------------------


def _group_ids(samples: Sequence[Sample], groups: Sequence[Sequence[int]]) -> list[int]:
    ids = [-1] * len(samples)
    for gid, group in enumerate(groups):
        for i in group:
            ids[i] = gid
    if -1 in ids:
        raise ValueError("groups must cover every sample (pass singletons too, as connected_groups returns them)")
    return ids


def grouped_splits(
    samples: Sequence[Sample], groups: Sequence[Sequence[int]], val_fraction: float = 0.15, seed: int = 42
) -> dict[Path, str]:
    """path -> 'train' | 'validation' | 'clean_test' | 'test_leaked', never splitting a group.

    Validation is drawn from the Train folder with whole groups: groups are visited in a
    seeded order and a group joins validation while its majority class is still short of
    ``val_fraction`` of that class (counting its size to the nearest boundary), which keeps
    the per-class shares close to the target even though groups have different sizes.
    Published Test images stay test; those with a near-copy in Train become 'test_leaked'.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    gid = _group_ids(samples, groups)
    train_members: dict[int, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        if sample.split in ("train", "validation"):  # a published validation folder is re-drawn, grouped
            train_members[gid[i]].append(i)
    per_class = Counter(samples[i].label for members in train_members.values() for i in members)
    target = {label: val_fraction * count for label, count in per_class.items()}
    taken: Counter[str] = Counter()
    order = sorted(train_members)
    np.random.default_rng(seed).shuffle(order)
    result: dict[Path, str] = {}
    for g in order:
        members = train_members[g]
        labels = Counter(samples[i].label for i in members)
        majority = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        to_validation = taken[majority] + len(members) / 2 <= target[majority]
        if to_validation:
            taken.update(labels)
        for i in members:
            result[samples[i].path] = VALIDATION if to_validation else TRAIN
    has_train = {gid[i] for i, s in enumerate(samples) if s.split in ("train", "validation")}
    for i, sample in enumerate(samples):
        if sample.split == "test":
            result[sample.path] = TEST_LEAKED if gid[i] in has_train else CLEAN_TEST
    return result


def grouped_folds(
    samples: Sequence[Sample], groups: Sequence[Sequence[int]], k: int = 5, seed: int = 42
) -> dict[Path, int]:
    """path -> fold (0..k-1) for the Train-folder images: stratified by label, a group never straddles folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    gid = _group_ids(samples, groups)
    idx = [i for i, s in enumerate(samples) if s.split in ("train", "validation")]
    if len({gid[i] for i in idx}) < k:
        raise ValueError(f"--folds {k} is more than the {len({gid[i] for i in idx})} groups of training images")
    labels = [samples[i].label for i in idx]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds: dict[Path, int] = {}
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(idx)), labels, [gid[i] for i in idx])):
        for position in held_out:
            folds[samples[idx[position]].path] = fold
    return folds


def split_table(samples: Sequence[Sample], assignment: dict[Path, str]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        table[assignment[sample.path]][sample.label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(table.items())}


# --- Outputs ------------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def write_manifest(
    samples: Sequence[Sample], assignment: dict[Path, str], gid: Sequence[int], root: Path, path: str | os.PathLike
) -> Path:
    """path (relative to the data root), label, split, group; sorted by path so a seed gives identical bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted((_relative(s.path, root), s.label, assignment[s.path], g) for s, g in zip(samples, gid))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "group"])
        writer.writerows(rows)
    return path


def write_pairs(
    samples: Sequence[Sample], pairs: Sequence[tuple[int, int, str]], hash_d: np.ndarray, cosine: np.ndarray, root: Path, path: Path
) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PAIR_COLUMNS)
        for i, j, kind in pairs:
            a, b = samples[i], samples[j]
            cos = "" if np.isnan(cosine[i, j]) else f"{cosine[i, j]:.4f}"
            writer.writerow(
                [_relative(a.path, root), _relative(b.path, root), a.label, b.label, a.split, b.split, int(hash_d[i, j]), cos, kind]
            )
    return path


def group_records(samples: Sequence[Sample], groups: Sequence[Sequence[int]], root: Path) -> list[dict[str, Any]]:
    """Duplicate groups (size >= 2) with flags, conflicts and leaks first, then by size."""
    records = [
        {
            "leak": is_leak(g, samples),
            "conflict": is_conflict(g, samples),
            "labels": sorted({samples[i].label for i in g}),
            "members": [{"path": _relative(samples[i].path, root), "label": samples[i].label, "split": samples[i].split} for i in g],
            "indices": list(g),
        }
        for g in groups
        if len(g) > 1
    ]
    return sorted(records, key=lambda r: (not r["conflict"], not r["leak"], -len(r["members"]), r["members"][0]["path"]))


def _caption(i: int, first: int, hash_d: np.ndarray, cosine: np.ndarray) -> str:
    if i == first:
        return "reference"
    cos = "" if np.isnan(cosine[first, i]) else f" cos {cosine[first, i]:.2f}"
    return f"d {hash_d[first, i]}{cos}"


def contact_sheet(
    records: Sequence[dict[str, Any]],
    samples: Sequence[Sample],
    hash_d: np.ndarray,
    cosine: np.ndarray,
    path: Path,
    max_rows: int = 40,
    max_cols: int = 8,
    thumb: int = 112,
) -> Path | None:
    """One row per group, each thumbnail captioned split, label and distances to the row's first image."""
    rows = list(records[:max_rows])
    if not rows:
        return None
    header, caption = 14, 38
    width = max_cols * (thumb + 4) + 4
    sheet = Image.new("RGB", (width, len(rows) * (header + thumb + caption) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = 2
    for number, record in enumerate(rows):
        members = record["indices"]
        flags = " + ".join(name.upper() for name in ("conflict", "leak") if record[name])
        more = f", showing {max_cols}" if len(members) > max_cols else ""
        text = f"group {number}: {len(members)} images{more}" + (f"  --  {flags}" if flags else "")
        draw.text((4, y), text, fill="red" if flags else "black", font=font)
        y += header
        for col, i in enumerate(members[:max_cols]):
            x = 4 + col * (thumb + 4)
            try:
                image = load_image(samples[i].path)
                image.thumbnail((thumb, thumb))
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            except ImageLoadError:  # listed in summary.json already; keep the slot visible
                draw.rectangle((x, y, x + thumb, y + thumb), outline="red")
            for line, words in enumerate((samples[i].split, samples[i].label[:19], _caption(i, members[0], hash_d, cosine))):
                draw.text((x, y + thumb + 1 + 12 * line), words, fill="black", font=font)
        y += thumb + caption
    sheet.save(path)
    return path


def write_reports(out_dir: Path, found: Duplicates, root: Path, max_rows: int) -> list[dict[str, Any]]:
    """pairs.csv, groups.json and contact_sheet.png (summary.json is written last, with the timing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = found.features.samples
    records = group_records(samples, found.groups, root)
    write_pairs(samples, found.pairs, found.hash_d, found.cosine, root, out_dir / "pairs.csv")
    (out_dir / "groups.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "indices"} for r in records], indent=1))
    contact_sheet(records, samples, found.hash_d, found.cosine, out_dir / "contact_sheet.png", max_rows)
    return records


# --- CLI ------------------------------------------------------------------------------------------


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


def scan(data_dir: str | None) -> tuple[Path, list[Sample]]:
    root = resolve_data_dir(data_dir)
    samples = scan_folder(root)
    if not samples:
        raise DatasetError(f"--data_dir {root}: no image files found")
    return root, samples


def build_summary(found: Duplicates, assignment: dict[Path, str], args: AuditArguments) -> dict[str, Any]:
    samples = found.features.samples
    summary = summarise(samples, found.groups, found.pairs, found.features.exact)
    summary.update(
        thresholds={"hash_distance_max": args.hash_threshold, "cosine_min": args.cosine_threshold if args.embeddings else None},
        unreadable=[path for path, _ in found.features.broken],
        seed=args.seed,
        val_fraction=args.val_fraction,
        grouped_splits=split_table(samples, assignment),
    )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    shown = {k: v for k, v in summary.items() if k not in ("grouped_splits", "unreadable")}
    width = max(len(k) for k in shown)
    lines = [f"{key:<{width}}  {value}" for key, value in shown.items()]
    for split, counts in summary["grouped_splits"].items():
        lines.append(f"{split:<{width}}  {sum(counts.values())} images {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(AuditArguments, argv)
    start = time.perf_counter()
    root, samples = scan(args.data_dir)
    features = extract_features(samples, embed=args.embeddings, batch_size=args.batch_size)
    found = find_duplicates(features, args.hash_threshold, args.cosine_threshold)
    assignment = grouped_splits(features.samples, found.groups, args.val_fraction, args.seed)
    write_manifest(features.samples, assignment, _group_ids(features.samples, found.groups), root, args.manifest)
    write_reports(Path(args.out_dir), found, root, args.max_sheet_rows)
    summary = build_summary(found, assignment, args)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"\nReport written to {args.out_dir}, manifest to {args.manifest}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad flags or data: one clear line, no traceback
        sys.exit(f"error: {error}")
