"""Find the images of a fracture dataset on disk and turn them into a ``datasets.DatasetDict``.

Three layouts are recognised without being told which one it is:

* Roboflow folder export: ``train|valid|test/<class>/*``
* the Kaggle layout of our copy: ``<class>/Train|Test/*``
* a plain folder: ``<class>/*`` (everything is training data)

Class folder names are normalised ("Hairline Fracture" -> "Hairline"). Broken files are
reported by name and skipped; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
from PIL import Image
from tqdm.auto import tqdm

from .images import ImageLoadError, is_image_file, load_image, to_rgb

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "BONEBREAK_DATA"
DEFAULT_DATA_DIR = Path("data/bone-break")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "validation",
    "val": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
SPLITS = ("train", "validation", "test", "clean_test")
DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "splits" / "bone_break_manifest.csv"


class DatasetError(ValueError):
    """The data folder cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str  # one of SPLITS, or "test_leaked" (a published Test image with a near-copy in Train)


def resolve_data_dir(option: str | os.PathLike | None = None) -> Path:
    """``--data_dir`` wins, then the BONEBREAK_DATA variable, then ``data/bone-break``."""
    chosen = option or os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def clean_label(folder_name: str) -> str:
    """'Hairline Fracture' -> 'Hairline', 'avulsion_fracture' -> 'Avulsion', 'Fracture Dislocation' stays."""
    words = re.sub(r"[_\-\s]+", " ", folder_name).strip().split(" ")
    if len(words) > 1 and words[-1].lower() == "fracture":
        words = words[:-1]
    return " ".join(word[:1].upper() + word[1:] for word in words if word)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def detect_layout(root: Path) -> str:
    """Return 'roboflow', 'kaggle' or 'plain' for a dataset folder."""
    children = _subdirs(root)
    if children and all(c.name.lower() in SPLIT_ALIASES for c in children):
        return "roboflow"
    if children and any(
        _subdirs(c) and all(s.name.lower() in SPLIT_ALIASES for s in _subdirs(c)) for c in children
    ):
        return "kaggle"
    return "plain"


def scan_folder(root: str | os.PathLike) -> list[Sample]:
    """List every image file under ``root`` with its clean label and split (no decoding)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"data folder {root} does not exist; pass --data_dir PATH, set {DATA_ENV_VAR}=PATH or put the dataset "
            f"at {DEFAULT_DATA_DIR} (where to get it: \"Getting the data\" in README.md)"
        )
    layout = detect_layout(root)
    samples: list[Sample] = []
    if layout == "roboflow":
        for split_dir in _subdirs(root):
            for class_dir in _subdirs(split_dir):
                split = SPLIT_ALIASES[split_dir.name.lower()]
                samples += [Sample(p, clean_label(class_dir.name), split) for p in _images_in(class_dir)]
    elif layout == "kaggle":
        for class_dir in _subdirs(root):
            for split_dir in _subdirs(class_dir):
                split = SPLIT_ALIASES.get(split_dir.name.lower())
                if split is None:
                    raise DatasetError(
                        f"{split_dir}: expected Train/Test (or valid) folders inside each class folder"
                    )
                samples += [Sample(p, clean_label(class_dir.name), split) for p in _images_in(split_dir)]
    else:
        for class_dir in _subdirs(root):
            samples += [Sample(p, clean_label(class_dir.name), "train") for p in _images_in(class_dir)]
    logger.info("%s: %s layout, %d image files", root, layout, len(samples))
    return samples


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


def _carve_validation(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split of train into train/validation."""
    from sklearn.model_selection import train_test_split

    labels = [s.label for s in train]
    counts = Counter(labels)
    n_val = max(round(len(train) * fraction), len(counts))
    stratify = labels if min(counts.values()) >= 2 and n_val <= len(train) - len(counts) else None
    if stratify is None:
        logger.warning("some class has fewer than 2 training images: validation split is not stratified")
    kept, held_out = train_test_split(train, test_size=n_val, random_state=seed, stratify=stratify)
    return [Sample(s.path, s.label, "train") for s in kept], [Sample(s.path, s.label, "validation") for s in held_out]


def split_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sample in samples:
        counts.setdefault(sample.split, Counter())[sample.label] += 1
    return {split: dict(sorted(c.items())) for split, c in counts.items()}


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
    """A split decoded once into memory as RGB images, transformed on every access.

    ``datasets`` decodes the JPEG again on every read (every epoch, in every worker); this
    decodes it once (about 0.5 GB for this dataset's training split). Workers forked by the
    DataLoader share the decoded pixels copy-on-write. Trainer accepts it as a map-style dataset.
    """

    def __init__(self, split: datasets.Dataset, transform: Callable[[Image.Image], Any], targets: Sequence[Any] | None = None,
                 desc: str = "Decoding images") -> None:
        self.images = [to_rgb(row["image"]) for row in tqdm(split, desc=desc, unit="img", leave=False)]
        self.labels = list(split["label"])  # class indices, also when training targets are soft
        self.targets = list(targets) if targets is not None else self.labels
        if len(self.targets) != len(self.images):
            raise ValueError(f"{len(self.targets)} training targets for {len(self.images)} images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.transform(self.images[index]), "labels": self.targets[index]}


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """relative path -> split, from a manifest written by ``python -m bonebreak.audit``."""
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "split"} <= set(rows[0]):
        raise DatasetError(f"{path}: not a split manifest (expected columns path,label,split[,group])")
    return {row["path"]: row["split"] for row in rows}


def read_manifest_groups(path: str | os.PathLike, root: Path) -> dict[Path, str]:
    """absolute image path -> near-duplicate group id, from the manifest's ``group`` column."""
    import csv

    with open(path, newline="") as handle:
        return {root / row["path"]: row.get("group") or row["path"] for row in csv.DictReader(handle)}


def apply_manifest(samples: list[Sample], root: Path, manifest: dict[str, str], exact: bool = False) -> list[Sample] | None:
    """Re-split samples as the manifest says, or None if it does not describe every file
    (with ``exact``, also None if it lists files that are not there: a different folder)."""
    relative = [s.path.relative_to(root).as_posix() for s in samples]
    if not all(r in manifest for r in relative) or (exact and len(set(relative)) != len(manifest)):
        return None
    return [Sample(s.path, s.label, manifest[r]) for s, r in zip(samples, relative)]


def _manifest_path(manifest: str | os.PathLike | None) -> Path | None:
    if manifest is None or str(manifest).lower() == "none":
        return None
    return DEFAULT_MANIFEST if str(manifest) == "auto" else Path(manifest)


def _grouped(samples: list[Sample], root: Path, manifest: str | os.PathLike | None) -> list[Sample] | None:
    """Leak-free splits from a manifest: explicit path, "auto" (the shipped one if it fits) or None."""
    path = _manifest_path(manifest)
    if path is None:
        return None
    auto = str(manifest) == "auto"
    if not path.is_file():
        if auto:
            return None
        raise DatasetError(f"--split_manifest {path} does not exist (write one with `python -m bonebreak.audit`)")
    grouped = apply_manifest(samples, root, read_manifest(path), exact=auto)
    if grouped is None:
        if auto:
            logger.info("%s does not describe %s: carving a stratified validation split instead", path, root)
            return None
        raise DatasetError(f"--split_manifest {path} does not list every image under {root}; rerun `python -m bonebreak.audit`")
    logger.info("using the leak-free grouped splits of %s", path)
    return grouped


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


def load_splits(
    data_dir: str | os.PathLike,
    val_fraction: float = 0.15,
    seed: int = 42,
    check_images: bool = True,
    split_manifest: str | os.PathLike | None = "auto",
) -> LoadedData:
    """Scan, validate and split a dataset folder into train/validation/test(/clean_test) ``datasets``.

    With a grouped manifest (``python -m bonebreak.audit``; "auto" picks the shipped one when
    it lists every file), near-duplicates never straddle train/validation, and "clean_test"
    holds the published Test images that have no near-copy in Train. Otherwise, when the
    folder has no validation split, one is carved out of train (stratified, seeded). Test
    images are passed through untouched and never trained on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    root = Path(data_dir)
    samples = scan_folder(root)
    if not samples:
        raise DatasetError(f"{root}: no image files found (looked for {', '.join(sorted({'.jpg', '.png', '.dcm'}))} ...)")
    grouped = _grouped(samples, root, split_manifest)
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
        by_split["train"], by_split["validation"] = _carve_validation(by_split["train"], val_fraction, seed)
    samples = [s for split in SPLITS for s in by_split[split]]
    counts = split_counts(samples)
    _log_counts(counts)
    splits = datasets.DatasetDict(
        {split: to_dataset(items, labels) for split, items in by_split.items() if items}
    )
    return LoadedData(splits, labels, counts, broken, detect_layout(root), grouped=bool(grouped), root=root,
                      manifest=_manifest_path(split_manifest) if grouped else None)
