"""Which image belongs to which split, and the near-duplicate groups that must never straddle two.

* ``Split``: the names every tool uses (train, validation, test, clean_test, test_leaked).
* Grouped, leak-free splits and k folds (groups from ``bonebreak audit``).
* The split manifest CSV (path, label, split, group) that records them, and reading it back.
* A stratified random validation split for folders that no manifest describes.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

logger = logging.getLogger(__name__)


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"  # the published Test folder, leaks included
    CLEAN_TEST = "clean_test"  # published Test images with no near-copy in Train
    TEST_LEAKED = "test_leaked"  # published Test images with a near-copy in Train (manifest only)


SPLITS = (Split.TRAIN, Split.VALIDATION, Split.TEST, Split.CLEAN_TEST)  # the splits of a loaded DatasetDict
EVALUATION_SPLITS = (Split.VALIDATION, Split.TEST, Split.CLEAN_TEST)  # what reports show, side by side
DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "splits" / "bone_break_manifest.csv"


class DatasetError(ValueError):
    """The data folder cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str  # a Split value


def check_fraction(value: float, flag: str = "--val_fraction") -> float:
    """The share of Train held out for validation, or a ValueError naming the flag."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"invalid value for {flag} ({value}): it must lie between 0 and 1")
    return value


def carve_validation(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split of train into train/validation."""
    labels = [s.label for s in train]
    counts = Counter(labels)
    n_val = max(round(len(train) * fraction), len(counts))
    rare = min(counts.values()) < 2
    too_big = n_val > len(train) - len(counts)  # stratifying needs every class left in train too
    stratify = None if rare or too_big else labels
    if rare:
        logger.warning("some class has fewer than 2 training images: validation split is not stratified")
    elif too_big:
        logger.warning("validation would take %d of %d training images, leaving too few to keep every class in both: "
                       "validation split is not stratified (lower --val_fraction)", n_val, len(train))
    kept, held_out = train_test_split(train, test_size=n_val, random_state=seed, stratify=stratify)
    return [Sample(s.path, s.label, "train") for s in kept], [Sample(s.path, s.label, "validation") for s in held_out]


def split_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sample in samples:
        counts.setdefault(sample.split, Counter())[sample.label] += 1
    return {split: dict(sorted(c.items())) for split, c in counts.items()}


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """relative path -> split, from a manifest written by ``bonebreak audit``."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "split"} <= set(rows[0]):
        raise DatasetError(f"{path}: not a split manifest (expected columns path,label,split[,group])")
    return {row["path"]: row["split"] for row in rows}


def read_manifest_groups(path: str | os.PathLike, root: Path) -> dict[Path, str]:
    """absolute image path -> near-duplicate group id, from the manifest's ``group`` column."""
    with open(path, newline="") as handle:
        return {root / row["path"]: row.get("group") or row["path"] for row in csv.DictReader(handle)}


def apply_manifest(samples: list[Sample], root: Path, manifest: dict[str, str], exact: bool = False) -> list[Sample] | None:
    """Re-split samples as the manifest says, or None if it does not describe every file
    (with ``exact``, also None if it lists files that are not there: a different folder)."""
    relative = [s.path.relative_to(root).as_posix() for s in samples]
    if not all(r in manifest for r in relative) or (exact and len(set(relative)) != len(manifest)):
        return None
    return [Sample(s.path, s.label, manifest[r]) for s, r in zip(samples, relative)]


def manifest_path(manifest: str | os.PathLike | None) -> Path | None:
    if manifest is None or str(manifest).lower() == "none":
        return None
    return DEFAULT_MANIFEST if str(manifest) == "auto" else Path(manifest)


def grouped_from_manifest(samples: list[Sample], root: Path, manifest: str | os.PathLike | None) -> list[Sample] | None:
    """Leak-free splits from a manifest: explicit path, "auto" (the shipped one if it fits) or None."""
    path = manifest_path(manifest)
    if path is None:
        return None
    auto = str(manifest) == "auto"
    if not path.is_file():
        if auto:
            return None
        raise DatasetError(f"--split_manifest {path} does not exist (write one with `bonebreak audit`)")
    grouped = apply_manifest(samples, root, read_manifest(path), exact=auto)
    if grouped is None:
        if auto:
            logger.info("%s does not describe %s: carving a stratified validation split instead", path, root)
            return None
        raise DatasetError(f"--split_manifest {path} does not list every image under {root}; rerun `bonebreak audit`")
    logger.info("using the leak-free grouped splits of %s", path)
    return grouped


def group_ids(samples: Sequence[Sample], groups: Sequence[Sequence[int]]) -> list[int]:
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
    check_fraction(val_fraction)
    gid = group_ids(samples, groups)
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
            result[samples[i].path] = Split.VALIDATION if to_validation else Split.TRAIN
    has_train = {gid[i] for i, s in enumerate(samples) if s.split in ("train", "validation")}
    for i, sample in enumerate(samples):
        if sample.split == "test":
            result[sample.path] = Split.TEST_LEAKED if gid[i] in has_train else Split.CLEAN_TEST
    return result


def grouped_folds(
    samples: Sequence[Sample], groups: Sequence[Sequence[int]], k: int = 5, seed: int = 42
) -> dict[Path, int]:
    """path -> fold (0..k-1) for the Train-folder images: stratified by label, a group never straddles folds."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    gid = group_ids(samples, groups)
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


def relative_path(path: Path, root: Path) -> str:
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
    rows = sorted((relative_path(s.path, root), s.label, assignment[s.path], g) for s, g in zip(samples, gid))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "group"])
        writer.writerows(rows)
    return path
