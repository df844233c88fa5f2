"""Visitors' feedback, and the person's review that turns it into training images.

The app stores a flag only when it runs with ``--feedback_dir`` (off by default: a public Space keeps no uploads
unasked). One flag is a copy of the upload *as the model read it* (the predictor's own decoder), saved as PNG named by
its content hash, and one row of ``feedback.csv``. Nothing a visitor sends becomes a path: the verdict must be one
of ``VERDICTS`` and the type one of the model's labels. The folder is bounded in flags and bytes; a full folder
refuses new flags with ``FeedbackFull``, a message for the page.

``bonebreak feedback`` then writes ``review.csv`` (a person fills its ``accept`` column) and, with ``--apply``,
``extra_train/<label>/<image>`` for ``bonebreak train --extra_train_dir``. "Not an X-ray" flags never become
training images. Standard library, numpy and Pillow only: an exported Space ships this module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..common.files import write_atomically

RIGHT, WRONG, NOT_XRAY = "right", "wrong", "not an X-ray"
VERDICTS = (RIGHT, WRONG, NOT_XRAY)
FLAGS_FILE = "feedback.csv"
IMAGES = "images"
COLUMNS = ("time_utc", "model", "image", "predicted", "probability", "xray_check", "verdict", "visitor_type")
REVIEW_FILE = "review.csv"
REVIEW_COLUMNS = ("image", "time_utc", "model", "predicted", "probability", "verdict", "visitor_type", "proposed_label", "accept")
EXTRA_TRAIN = "extra_train"
DEFAULT_MAX_FLAGS = 1000
DEFAULT_MAX_MB = 500
IMAGE_NAME = re.compile(r"^images/[0-9a-f]{32}\.png$")  # the only image names a store writes


class InvalidFeedback(ValueError):
    """A verdict or type outside the fixed choices: refused, nothing stored."""


class FeedbackFull(RuntimeError):
    """The folder holds its maximum of flags or bytes: the page says so, nothing is stored."""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FeedbackStore:
    """A bounded folder of flags: ``images/<sha256>.png`` and ``feedback.csv``, safe for concurrent requests."""

    folder: Path
    model: str  # the served checkpoint folder's name, recorded in each row
    labels: Sequence[str]
    max_flags: int = DEFAULT_MAX_FLAGS
    max_bytes: int = DEFAULT_MAX_MB * 1024 * 1024
    clock: Callable[[], str] = utc_now
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.max_flags < 1 or self.max_bytes < 1:
            raise ValueError("--feedback_max_flags and --feedback_max_mb must be positive")

    def check(self, verdict: str | None, visitor_type: str | None, predicted: str | None = None) -> str:
        """The visitor's type to record ("" unless the answer was wrong); InvalidFeedback for anything outside the choices."""
        if verdict not in VERDICTS:
            raise InvalidFeedback(f"Choose one of: {', '.join(VERDICTS)}.")
        if visitor_type and visitor_type not in self.labels:
            raise InvalidFeedback(f"Unknown fracture type: choose one of {', '.join(self.labels)}.")
        if verdict != WRONG:
            return ""
        if not visitor_type:
            raise InvalidFeedback("Choose the right fracture type for a wrong answer.")
        if visitor_type == predicted:
            raise InvalidFeedback(f"The answer was {predicted}: pick the type it should have been, or mark it right.")
        return visitor_type

    def used(self) -> tuple[int, int]:
        """Flags stored and bytes used (images and the CSV)."""
        rows = 0
        flags = self.folder / FLAGS_FILE
        if flags.is_file():
            with open(flags, newline="") as handle:
                rows = max(sum(1 for _ in csv.reader(handle)) - 1, 0)
        images = self.folder / IMAGES
        size = sum(p.stat().st_size for p in images.iterdir() if p.is_file()) if images.is_dir() else 0
        return rows, size + (flags.stat().st_size if flags.is_file() else 0)

    def record(self, image: Image.Image, predicted: str, probability: float, verdict: str | None, visitor_type: str | None,
               xray_check: bool | None = None) -> dict[str, str]:
        """Store one flag: the decoded image as PNG and one CSV row. Returns the row."""
        kind = self.check(verdict, visitor_type, predicted)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = f"{IMAGES}/{hashlib.sha256(data).hexdigest()[:32]}.png"
        row = {"time_utc": self.clock(), "model": self.model, "image": name, "predicted": predicted,
               "probability": f"{probability:.4f}", "xray_check": {None: "", True: "passed", False: "failed"}[xray_check],
               "verdict": verdict, "visitor_type": kind}
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow([row[c] for c in COLUMNS])
        with self._lock:
            flags, used = self.used()
            path = self.folder / name
            added = (0 if path.is_file() else len(data)) + len(line.getvalue().encode())
            if flags >= self.max_flags or used + added > self.max_bytes:
                raise FeedbackFull("Thank you, but the feedback folder is full, so this flag was not stored. "
                                   "The people running this app review and empty it from time to time.")
            if not path.is_file():
                write_atomically(path, data)
            self._append(line.getvalue())
        return row

    def _append(self, text: str) -> None:
        """One write of the row (with the header first in a new file), appended: readers never see half a row."""
        path = self.folder / FLAGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(handle).st_size == 0:
                text = ",".join(COLUMNS) + "\n" + text
            os.write(handle, text.encode())
        finally:
            os.close(handle)


def read_flags(folder: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(folder) / FLAGS_FILE
    if not path.is_file():
        raise ValueError(f"--feedback_dir {folder}: no {FLAGS_FILE} (the folder `bonebreak app --feedback_dir` writes)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no flags yet")
    return rows


def proposed_label(flag: dict[str, str]) -> str:
    """The label a flag proposes to train under: the visitor's type when wrong, the answer when right, none otherwise."""
    return {WRONG: flag["visitor_type"], RIGHT: flag["predicted"]}.get(flag["verdict"], "")


def write_review(feedback_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``review.csv``: one row per flag with an empty ``accept`` column; decisions already in it are kept."""
    review = Path(out_dir) / REVIEW_FILE
    kept = {(row["image"], row["time_utc"]): row.get("accept", "") for row in read_review(review, required=False)}
    rows = [{**{c: flag.get(c, "") for c in REVIEW_COLUMNS}, "proposed_label": proposed_label(flag),
             "accept": kept.get((flag["image"], flag["time_utc"]), "")} for flag in read_flags(feedback_dir)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REVIEW_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(review, text.getvalue())
    return rows


def read_review(path: Path, required: bool = True) -> list[dict[str, str]]:
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: no such file; run `bonebreak feedback` without --apply first, then fill its accept column")
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def decision(row: dict[str, str], path: Path) -> bool | None:
    value = (row.get("accept") or "").strip().lower()
    if value not in ("", "yes", "no"):
        raise ValueError(f"{path}: accept must be yes, no or empty, got '{row['accept']}' for {row['image']}")
    return None if not value else value == "yes"


def apply_review(feedback_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """Copy the accepted flags' images into ``extra_train/<label>/``; counts per label. Refuses an unreviewed file."""
    review = Path(out_dir) / REVIEW_FILE
    rows = read_review(review)
    decisions = [decision(row, review) for row in rows]
    if all(d is None for d in decisions):
        raise ValueError(f"{review} has no accept decisions: edit it and write yes or no in the accept column of each row")
    chosen: dict[str, str] = {}
    for row, accepted in zip(rows, decisions):
        label = row["proposed_label"].strip()
        if not accepted or row["verdict"] == NOT_XRAY or not label:
            continue  # "not an X-ray" flags are never training images
        image_ok = IMAGE_NAME.match(row["image"]) and (Path(feedback_dir) / row["image"]).is_file()
        if not image_ok or label.startswith(".") or "/" in label or "\\" in label:
            raise ValueError(f"{review}: row for '{row['image']}' names no feedback image or an unusable label '{label}'")
        if chosen.setdefault(row["image"], label) != label:
            raise ValueError(f"{review}: {row['image']} is accepted under two labels ({chosen[row['image']]}, {label}): accept one")
    target = Path(out_dir) / EXTRA_TRAIN
    if target.is_dir():
        shutil.rmtree(target)  # written afresh from the decisions as they stand now
    counts: dict[str, int] = {}
    for image, label in chosen.items():
        (target / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(feedback_dir) / image, target / label / Path(image).name)
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))
