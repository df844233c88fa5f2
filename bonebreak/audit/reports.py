"""What ``bonebreak audit`` writes: pairs.csv, groups.json, a contact sheet to check by
eye, summary.json, and the grouped split manifest (``audit_dataset`` runs the whole audit)."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.contact_sheets import SheetLayout, SheetRow, Thumbnail, draw_contact_sheet
from ..data.layouts import resolve_data_dir, scan_folder
from ..data.splits import DatasetError, Sample, group_ids, grouped_splits, relative_path, split_table, write_manifest
from .duplicates import Duplicates, duplicate_counts, extract_features, find_duplicates, is_conflict, is_leak

logger = logging.getLogger(__name__)


PAIR_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "split_a", "split_b", "hash_distance", "cosine", "kind"]


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
                [relative_path(a.path, root), relative_path(b.path, root), a.label, b.label, a.split, b.split, int(hash_d[i, j]), cos, kind]
            )
    return path


def group_records(samples: Sequence[Sample], groups: Sequence[Sequence[int]], root: Path) -> list[dict[str, Any]]:
    """Duplicate groups (size >= 2) with flags, conflicts and leaks first, then by size."""
    records = [
        {
            "leak": is_leak(g, samples),
            "conflict": is_conflict(g, samples),
            "labels": sorted({samples[i].label for i in g}),
            "members": [{"path": relative_path(samples[i].path, root), "label": samples[i].label, "split": samples[i].split} for i in g],
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


def contact_sheet(records: Sequence[dict[str, Any]], samples: Sequence[Sample], hash_d: np.ndarray, cosine: np.ndarray, path: Path,
                  max_rows: int = 40, max_cols: int = 8) -> Path | None:
    """One row per group, each thumbnail captioned split, label and distances to the row's first image."""
    rows = []
    for number, record in enumerate(records[:max_rows]):
        members = record["indices"]
        flags = " + ".join(name.upper() for name in ("conflict", "leak") if record[name])
        more = f", showing {max_cols}" if len(members) > max_cols else ""
        header = f"group {number}: {len(members)} images{more}" + (f"  --  {flags}" if flags else "")
        thumbnails = [Thumbnail(samples[i].path, (samples[i].split, samples[i].label[:19], _caption(i, members[0], hash_d, cosine)))
                      for i in members[:max_cols]]
        rows.append(SheetRow(thumbnails, header, header_alert=bool(flags)))
    return draw_contact_sheet(rows, path, SheetLayout(thumb=112, columns=max_cols))


def write_reports(out_dir: Path, found: Duplicates, root: Path, max_rows: int) -> list[dict[str, Any]]:
    """pairs.csv, groups.json and contact_sheet.png (summary.json is written last, with the timing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = found.features.samples
    records = group_records(samples, found.groups, root)
    write_pairs(samples, found.pairs, found.hash_d, found.cosine, root, out_dir / "pairs.csv")
    (out_dir / "groups.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "indices"} for r in records], indent=1))
    contact_sheet(records, samples, found.hash_d, found.cosine, out_dir / "contact_sheet.png", max_rows)
    return records


def scan(data_dir: str | None) -> tuple[Path, list[Sample]]:
    root = resolve_data_dir(data_dir)
    samples = scan_folder(root)
    if not samples:
        raise DatasetError(f"--data_dir {root}: no image files found")
    return root, samples


def build_summary(found: Duplicates, assignment: dict[Path, str], settings: dict[str, Any]) -> dict[str, Any]:
    samples = found.features.samples
    summary = duplicate_counts(samples, found.groups, found.pairs, found.features.exact)
    summary.update(
        thresholds={"hash_distance_max": settings["hash_threshold"], "cosine_min": settings["cosine_threshold"] if settings["embeddings"] else None},
        unreadable=[path for path, _ in found.features.broken],
        seed=settings["seed"],
        val_fraction=settings["val_fraction"],
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


def audit_dataset(
    data_dir: str | None, out_dir: str | Path, manifest: str | Path, hash_threshold: int, cosine_threshold: float,
    embeddings: bool = True, batch_size: int = 32, val_fraction: float = 0.15, seed: int = 42, max_sheet_rows: int = 40,
) -> dict[str, Any]:
    """Find the duplicates, draw grouped splits, write the reports and the manifest; returns the summary."""
    start = time.perf_counter()
    root, samples = scan(data_dir)
    features = extract_features(samples, embed=embeddings, batch_size=batch_size)
    found = find_duplicates(features, hash_threshold, cosine_threshold)
    assignment = grouped_splits(features.samples, found.groups, val_fraction, seed)
    write_manifest(features.samples, assignment, group_ids(features.samples, found.groups), root, manifest)
    write_reports(Path(out_dir), found, root, max_sheet_rows)
    settings = {"hash_threshold": hash_threshold, "cosine_threshold": cosine_threshold, "embeddings": embeddings, "seed": seed,
                "val_fraction": val_fraction}
    summary = build_summary(found, assignment, settings)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
