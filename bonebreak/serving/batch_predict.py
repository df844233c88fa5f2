"""Classify many files at once: expand folders, predict in batches, and format the rows as a
table, CSV or JSON. A bad file becomes an error row and the rest carry on."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..data.decode import ImageLoadError, is_image_file
from .loader import Classifier

FORMATS = ("table", "csv", "json")


@dataclass
class Row:
    path: str
    top: dict[str, float] = field(default_factory=dict)
    unsure: bool = False
    xray_check_passed: bool | None = None  # None: the checkpoint has no X-ray check
    error: str | None = None


def expand_paths(paths: Iterable[str]) -> tuple[list[Path], bool]:
    """Files as given, folders expanded to their image files; also whether a folder was seen."""
    files: list[Path] = []
    saw_folder = False
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            saw_folder = True
            files += sorted(p for p in path.rglob("*") if is_image_file(p))
        else:
            files.append(path)  # missing or odd files become error rows, not a crash
    return files, saw_folder


def predict_files(predictor: Classifier, files: list[Path], top_k: int = 3, batch_size: int = 16, progress: bool = False) -> list[Row]:
    rows: list[Row] = []
    bar = tqdm(total=len(files), desc="Predicting", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded, chunk_rows = [], []
        for path in chunk:
            row = Row(str(path))
            try:
                decoded.append(predictor.load(path))
                chunk_rows.append(row)
            except ImageLoadError as error:
                row.error = str(error)
            rows.append(row)
        if decoded:
            for row, prediction in zip(chunk_rows, predictor.predictions(decoded, batch_size=batch_size)):
                row.top, row.unsure, row.xray_check_passed = prediction.top(top_k), prediction.unsure, prediction.xray_check_passed
        bar.update(len(chunk))
    bar.close()
    return rows


def _xray_cell(row: Row) -> str:
    """The X-ray check's verdict as printed: passed, failed, or empty (no check, or the file was not read)."""
    return "" if row.error or row.xray_check_passed is None else "passed" if row.xray_check_passed else "failed"


def format_rows(rows: list[Row], fmt: str, top_k: int) -> str:
    if fmt == "json":
        return json.dumps(
            [
                {"path": r.path, "predictions": [{"label": k, "probability": round(v, 6)} for k, v in r.top.items()], "unsure": r.unsure, "xray_check": _xray_cell(r), "error": r.error}
                for r in rows
            ],
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["path", "status"] + [f"{kind}{i + 1}" for i in range(top_k) for kind in ("label", "probability")] + ["unsure", "xray_check", "error"])
        for r in rows:
            cells = [c for label, p in r.top.items() for c in (label, f"{p:.4f}")]
            cells += [""] * (2 * top_k - len(cells))
            flags = ["", ""] if r.error else [r.unsure, _xray_cell(r)]
            writer.writerow([r.path, "error" if r.error else "ok"] + cells + flags + [r.error or ""])
        return out.getvalue().rstrip("\n")
    width = max([len(r.path) for r in rows] + [4])
    lines = [f"{'file':<{width}}  prediction"]
    for r in rows:
        if r.error:
            detail = f"ERROR: {r.error}"
        else:
            detail = ", ".join(f"{label} {p:.1%}" for label, p in r.top.items()) + ("  (unsure)" if r.unsure else "")
            if r.xray_check_passed is False:
                detail = "FAILS THE X-RAY CHECK (not like a bone X-ray): " + detail
        lines.append(f"{r.path:<{width}}  {detail}")
    return "\n".join(lines)
