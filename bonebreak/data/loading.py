"""A dataset folder as ``datasets`` splits: every file decoded once (broken ones reported and skipped), split
without leaks, and handed to training as decoded images.

``load_splits`` is what train, evaluate, check-data and the lab read; ``cv_fold_data`` cuts the Train folder
into grouped folds (near-duplicate groups never straddle two folds).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
from PIL import Image
from tqdm.auto import tqdm

from .decode import ImageLoadError, load_image
from .layouts import detect_layout, scan_folder
from .splits import (
    SPLITS,
    DatasetError,
    Sample,
    carve_validation,
    check_fraction,
    grouped_folds,
    grouped_from_manifest,
    manifest_path,
    read_manifest_groups,
    split_counts,
)

logger = logging.getLogger(__name__)


def _check(sample: Sample) -> str | None:
    try:
        load_image(sample.path)
    except ImageLoadError as error:
        return str(error)
    return None


def drop_unreadable(samples: list[Sample], workers: int = 4) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Decode every file once; return the readable samples and (path, reason) for the rest."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(
            tqdm(pool.map(_check, samples), total=len(samples), desc="Checking images", leave=False)
        )
    good = [s for s, r in zip(samples, reasons) if r is None]
    broken = [(s.path, r) for s, r in zip(samples, reasons) if r is not None]
    for path, reason in broken:
        logger.warning("skipping unreadable image %s", reason)
    return good, broken


def split_counts_of(dataset: datasets.Dataset, labels: list[str]) -> dict[str, int]:
    counts = Counter(labels[i] for i in dataset["label"])
    return dict(sorted(counts.items()))


def _log_counts(counts: dict[str, dict[str, int]]) -> None:
    for split in SPLITS:
        if split in counts:
            per_class = ", ".join(f"{k}: {v}" for k, v in counts[split].items())
            logger.info("%s: %d images (%s)", split, sum(counts[split].values()), per_class)


def to_dataset(samples: list[Sample], labels: list[str]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)})
    return datasets.Dataset.from_dict(
        {"image": [str(s.path) for s in samples], "label": [labels.index(s.label) for s in samples]},
        features=features,
    )


class DecodedImages:
    """A split as Trainer inputs: each file decoded by ``images.load_image`` (the decoder the app uses, so
    DICOM, 16-bit PNG, size checks and downscaling behave the same), transformed on every access.

    With ``cache`` (the default) every image is decoded once into memory (about 0.5 GB for this
    dataset's training split) instead of on every read; workers forked by the DataLoader share the
    decoded pixels copy-on-write. ``targets``: soft training labels (distillation) instead of the classes.
    """

    def __init__(self, split: datasets.Dataset, transform: Callable[[Image.Image], Any], targets: Sequence[Any] | None = None,
                 cache: bool = True, desc: str = "Decoding images") -> None:
        self.paths = image_paths(split)
        self.images = [load_image(path) for path in tqdm(self.paths, desc=desc, unit="img", leave=False)] if cache else None
        self.labels = list(split["label"])  # class indices, also when training targets are soft
        self.targets = list(targets) if targets is not None else self.labels
        if len(self.targets) != len(self.paths):
            raise ValueError(f"{len(self.targets)} training targets for {len(self.paths)} images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index] if self.images is not None else load_image(self.paths[index])
        return {"pixel_values": self.transform(image), "labels": self.targets[index]}


@dataclass
class LoadedData:
    splits: datasets.DatasetDict
    labels: list[str]
    counts: dict[str, dict[str, int]]
    broken: list[tuple[Path, str]]
    layout: str
    grouped: bool = False  # splits come from a near-duplicate-grouped manifest
    root: Path = Path(".")
    manifest: Path | None = None
    training_edits: dict[str, Any] = field(default_factory=dict)  # what --exclude_file & co. changed (training_set.py)


def load_splits(
    data_dir: str | os.PathLike,
    val_fraction: float = 0.15,
    seed: int = 42,
    check_images: bool = True,
    split_manifest: str | os.PathLike | None = "auto",
) -> LoadedData:
    """Scan, validate and split a dataset folder into train/validation/test(/clean_test) ``datasets``.

    With a grouped manifest (``bonebreak audit``; "auto" picks the shipped one when
    it lists every file), near-duplicates never straddle train/validation, and "clean_test"
    holds the published Test images that have no near-copy in Train. Otherwise, when the
    folder has no validation split, one is carved out of train (stratified, seeded). Test
    images are passed through untouched and never trained on.
    """
    check_fraction(val_fraction)
    root = Path(data_dir)
    samples = scan_folder(root)
    if not samples:
        raise DatasetError(f"{root}: no image files found (looked for {', '.join(sorted({'.jpg', '.png', '.dcm'}))} ...)")
    grouped = grouped_from_manifest(samples, root, split_manifest)
    samples = grouped or samples
    broken: list[tuple[Path, str]] = []
    if check_images:
        samples, broken = drop_unreadable(samples)
    labels = sorted({s.label for s in samples})
    if len(labels) < 2:
        raise DatasetError(f"{root}: found {len(labels)} class(es) {labels}; at least 2 class folders are needed")
    by_split = {split: [s for s in samples if s.split == split] for split in SPLITS}
    if grouped:
        leaked = [Sample(s.path, s.label, "test") for s in samples if s.split == "test_leaked"]
        by_split["test"] = sorted([Sample(s.path, s.label, "test") for s in by_split["clean_test"]] + leaked, key=lambda s: s.path)
    if not by_split["train"]:
        raise DatasetError(f"{root}: no training images found")
    if not by_split["validation"]:
        by_split["train"], by_split["validation"] = carve_validation(by_split["train"], val_fraction, seed)
    samples = [s for split in SPLITS for s in by_split[split]]
    counts = split_counts(samples)
    _log_counts(counts)
    splits = datasets.DatasetDict(
        {split: to_dataset(items, labels) for split, items in by_split.items() if items}
    )
    return LoadedData(splits, labels, counts, broken, detect_layout(root), grouped=bool(grouped), root=root,
                      manifest=manifest_path(split_manifest) if grouped else None)


def label_index_map(data_labels: list[str], model_labels: list[str]) -> list[int]:
    """For each dataset label index, the model's index of the same label."""
    missing = [label for label in data_labels if label not in model_labels]
    if missing:
        raise ValueError(f"the dataset has classes the model does not know: {missing}; model labels: {model_labels}")
    return [model_labels.index(label) for label in data_labels]


def image_paths(dataset: datasets.Dataset) -> list[str]:
    return [item["path"] for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def one_per_group(dataset: datasets.Dataset, data: LoadedData) -> datasets.Dataset:
    """Keep the first image (in path order) of every near-duplicate group of the manifest."""
    if not data.grouped:
        raise ValueError("--dedup_groups needs the grouped split manifest (--split_manifest, see `bonebreak audit`)")
    group_of = read_manifest_groups(data.manifest, data.root)
    paths = image_paths(dataset)
    first: dict[str, int] = {}
    for i in sorted(range(len(paths)), key=paths.__getitem__):
        first.setdefault(group_of[Path(paths[i])], i)
    return dataset.select(sorted(first.values()))


def cv_fold_data(data: LoadedData, k: int, seed: int) -> list[LoadedData]:
    """Grouped, stratified k folds over the Train folder (train + validation of the manifest)."""
    if not data.grouped:
        raise ValueError("--cv_folds needs the grouped split manifest (--split_manifest, see `bonebreak audit`)")
    pool = datasets.concatenate_datasets([data.splits["train"], data.splits["validation"]])
    paths = [Path(p) for p in image_paths(pool)]
    group_of = read_manifest_groups(data.manifest, data.root)
    labels = [data.labels[i] for i in pool["label"]]
    samples = [Sample(path, label, "train") for path, label in zip(paths, labels)]
    members: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        members.setdefault(group_of[path], []).append(i)
    fold_of = grouped_folds(samples, list(members.values()), k=k, seed=seed)
    folds = []
    for fold in range(k):
        held_out = [i for i, p in enumerate(paths) if fold_of[p] == fold]
        kept = [i for i, p in enumerate(paths) if fold_of[p] != fold]
        splits = datasets.DatasetDict({"train": pool.select(kept), "validation": pool.select(held_out)})
        counts = {name: split_counts_of(ds, data.labels) for name, ds in splits.items()}
        folds.append(LoadedData(splits, data.labels, counts, data.broken, data.layout, grouped=True, root=data.root,
                                manifest=data.manifest))
    return folds


def load_splits_as_trained(arguments: dict[str, Any], data_dir: str | os.PathLike) -> LoadedData:
    """The splits a checkpoint was trained on, from the arguments its metrics.json records (same validation, same Test)."""
    return load_splits(data_dir, val_fraction=arguments["val_fraction"], seed=arguments["seed"],
                       split_manifest=arguments.get("split_manifest", "none"))
