"""What a run trains on: the training split after the data options that thin or fix it.

``--dedup_groups`` (one image per near-duplicate group), ``--exclude_file`` (paths to leave out),
``--relabel_file`` (path -> label), ``--max_train_samples`` and ``--extra_train_dir`` (class folders of images to add)
change the *training* images only. Validation, Test and clean Test keep every image and their original labels, and in
cross-validation the held-out fold is scored on all its images as labelled, so cleaning the
training labels can never flatter a score; an extra image that is a pixel-exact copy of a validation or Test image is
left out. ``bonebreak label-issues`` writes files that ``--exclude_file`` and ``--relabel_file`` read;
``bonebreak feedback --apply`` writes the folder ``--extra_train_dir`` reads.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from ..common.files import file_sha256
from .decode import load_image
from .layouts import scan_folder
from .loading import LoadedData, drop_unreadable, image_paths, one_per_group, split_counts_of, to_dataset

logger = logging.getLogger(__name__)

RELABEL_COLUMNS = ("label", "suggested_label")  # the column --relabel_file reads the new label from, first found wins


def _rows(path: str | os.PathLike, flag: str) -> tuple[list[dict[str, str]], list[str]]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag} {path}: no such file (a CSV with a 'path' column, e.g. from `bonebreak label-issues`)")
    with open(file, newline="") as handle:
        reader = csv.DictReader(handle)
        rows, columns = list(reader), list(reader.fieldnames or [])
    if "path" not in columns:
        raise ValueError(f"{flag} {path}: the CSV needs a 'path' column; its columns are {columns}")
    return rows, columns


def _resolve(path: str, root: Path) -> str:
    """A CSV path as the dataset lists it: absolute, or relative to the data folder (as the manifest writes them)."""
    candidate = Path(path)
    return os.path.abspath(candidate if candidate.is_absolute() else root / candidate)


def read_exclusions(path: str | os.PathLike, root: Path) -> set[str]:
    rows, _ = _rows(path, "--exclude_file")
    return {_resolve(row["path"], root) for row in rows}


def read_relabels(path: str | os.PathLike, root: Path, labels: list[str]) -> dict[str, str]:
    rows, columns = _rows(path, "--relabel_file")
    column = next((c for c in RELABEL_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(f"--relabel_file {path}: the CSV needs a 'label' (or 'suggested_label') column next to 'path'")
    unknown = sorted({row[column] for row in rows} - set(labels))
    if unknown:
        raise ValueError(f"--relabel_file {path}: unknown label(s) {unknown}; the dataset's labels are {labels}")
    return {_resolve(row["path"], root): row[column] for row in rows}


def check_known(paths: set[str], data: LoadedData, flag: str) -> None:
    """A listed path must be an image of this dataset: a typo or a file for another folder is an error, not a no-op."""
    known = {os.path.abspath(path) for split in data.splits.values() for path in image_paths(split)}
    unknown = sorted(paths - known)
    if unknown:
        raise ValueError(f"{flag}: {len(unknown)} path(s) are not images of {data.root}, e.g. {unknown[0]} "
                         "(paths are absolute or relative to --data_dir)")


def relabelled(split: datasets.Dataset, new_label: dict[str, str], labels: list[str]) -> tuple[datasets.Dataset, int]:
    paths = [os.path.abspath(p) for p in image_paths(split)]
    old = list(split["label"])
    new = [labels.index(new_label[p]) if p in new_label else old[i] for i, p in enumerate(paths)]
    changed = sum(a != b for a, b in zip(old, new))
    return split.remove_columns("label").add_column("label", new, feature=split.features["label"]), changed


def pixel_digest(path: str | os.PathLike) -> str:
    image = load_image(path)
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def extra_training_images(folder: str | os.PathLike, data: LoadedData) -> tuple[datasets.Dataset, dict[str, Any], list]:
    """``--extra_train_dir``: its class folders as a train split of ``data``'s labels, unreadable files and copies of
    validation or Test images left out; the record, and the unreadable files as (path, reason)."""
    flag = "--extra_train_dir"
    if not Path(folder).is_dir():
        raise ValueError(f"{flag} {folder}: no such folder (class folders of images, e.g. from `bonebreak feedback --apply`)")
    samples = scan_folder(folder)
    unknown = sorted({s.label for s in samples} - set(data.labels))
    if unknown:
        raise ValueError(f"{flag} {folder}: unknown label(s) {unknown}; the dataset's labels are {data.labels}")
    samples, broken = drop_unreadable(samples)
    # Test holds clean_test's images too: each held-out file is decoded once
    held_out_paths = {path for name, split in data.splits.items() if name != "train" for path in image_paths(split)}
    held_out = {pixel_digest(path) for path in held_out_paths}
    kept = []
    for sample in samples:
        if pixel_digest(sample.path) in held_out:
            logger.warning("%s: leaving out %s, a copy of a validation or Test image", flag, sample.path)
        else:
            kept.append(sample)
    record = {"path": str(folder), "images": len(kept), "per_label": dict(sorted(Counter(s.label for s in kept).items())),
              "unreadable": len(broken), "copies_of_held_out": len(samples) - len(kept)}
    return to_dataset(kept, data.labels), record, broken


def edit_training_split(
    data: LoadedData, *, seed: int, dedup_groups: bool = False, exclude_file: str | None = None, relabel_file: str | None = None,
    max_train_samples: int | None = None, extra_train_dir: str | None = None,
) -> tuple[LoadedData, dict[str, Any]]:
    """``data`` with its train split thinned and relabelled as asked; the record of what changed (for metrics.json
    and the model card). Only ``train`` changes."""
    train = data.splits["train"]
    record: dict[str, Any] = {"train_images_before": len(train)}
    if dedup_groups:
        train = one_per_group(train, data)
        record["dedup_groups"] = len(train)
        logger.info("--dedup_groups: %d of %d training images kept (one per near-duplicate group)", len(train), record["train_images_before"])
    if exclude_file:
        excluded = read_exclusions(exclude_file, data.root)
        check_known(excluded, data, "--exclude_file")
        paths = [os.path.abspath(p) for p in image_paths(train)]
        keep = [i for i, p in enumerate(paths) if p not in excluded]
        record["exclude_file"] = {"path": str(exclude_file), "sha256": file_sha256(exclude_file)[:16], "listed": len(excluded),
                                  "excluded_from_train": len(paths) - len(keep)}
        train = train.select(keep)
        logger.info("--exclude_file: %d training images left out (%d listed)", len(paths) - len(keep), len(excluded))
    if relabel_file:
        new_label = read_relabels(relabel_file, data.root, data.labels)
        check_known(set(new_label), data, "--relabel_file")
        train, changed = relabelled(train, new_label, data.labels)
        record["relabel_file"] = {"path": str(relabel_file), "sha256": file_sha256(relabel_file)[:16], "listed": len(new_label),
                                  "relabelled_in_train": changed}
        logger.info("--relabel_file: %d training labels changed (%d listed)", changed, len(new_label))
    if max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    broken = list(data.broken)
    if extra_train_dir:  # after the thinning options: every accepted extra image is trained on
        extra, record["extra_train_dir"], unreadable = extra_training_images(extra_train_dir, data)
        broken += unreadable
        train = datasets.concatenate_datasets([train, extra]) if len(extra) else train
        logger.info("--extra_train_dir: %d training images added (%s)", len(extra), record["extra_train_dir"]["per_label"])
    record["train_images"] = len(train)
    splits = datasets.DatasetDict({**data.splits, "train": train})
    counts = {**data.counts, "train": split_counts_of(train, data.labels)}
    return LoadedData(splits, data.labels, counts, broken, data.layout, data.grouped, data.root, data.manifest, record), record
