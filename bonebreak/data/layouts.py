"""Where a fracture dataset's images are on disk: the folder to read, its layout, each file's label and split.

Three layouts are recognised without being told which one it is:

* Roboflow folder export: ``train|valid|test/<class>/*``
* the Kaggle layout of our copy: ``<class>/Train|Test/*``
* a plain folder: ``<class>/*`` (everything is training data)

Class folder names are normalised ("Hairline Fracture" -> "Hairline"). Nothing is decoded here
(``bonebreak.data.loading`` does that, once per file).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .decode import is_image_file
from .splits import DatasetError, Sample

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
LAYOUTS = {
    "roboflow": "Roboflow folder export: train|valid|test/<class>/*",
    "kaggle": "Kaggle: <class>/Train|Test/*",
    "plain": "plain: <class>/* (all training data)",
}


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


