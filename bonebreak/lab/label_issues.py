"""Likely label errors: confident learning (``cleanlab``) on out-of-fold probabilities, plus the audit's
near-duplicate groups whose copies carry different labels. ``bonebreak label-issues`` is the front door.

Every Train image is scored by a grouped-CV fold model that saw neither it nor any near-copy of it
(``oof_probabilities.csv`` of a ``--cv_folds`` run; several runs, e.g. two CV seeds, are averaged per
image). clean-Test images are scored by the mean of the fold models, none of which saw Test. cleanlab's
``find_label_issues`` then flags the images whose given label is implausible next to what the models
believe, and ``get_label_quality_scores`` ranks them (self-confidence: the probability of the given label).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from ..data.contact_sheets import SheetLayout, Thumbnail, draw_contact_sheet, grid
from ..data.loading import LoadedData, image_paths
from ..data.splits import Split, read_manifest_groups, relative_path
from ..evaluation.reports import predict_dataset, read_probabilities
from ..models.torch_backend import load_ensemble

logger = logging.getLogger(__name__)

OOF_FILE = "oof_probabilities.csv"
MIN_PROBABILITY = 0.5  # the strict threshold's default: the fold models favour the other label over all others together
COLUMNS = ("path", "split", "given_label", "suggested_label", "label_quality", "suggested_probability", "flagged_by_cleanlab",
           "conflicting_group", "group", "group_labels")


def out_of_fold(cv_dirs: Sequence[str | os.PathLike]) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Paths, given labels and out-of-fold probabilities, averaged per image over the CV runs given."""
    sums: dict[str, np.ndarray] = {}
    seen: Counter[str] = Counter()
    given: dict[str, str] = {}
    labels: list[str] | None = None
    for folder in cv_dirs:
        file = Path(folder) / OOF_FILE
        if not file.is_file():
            raise ValueError(f"--cv_dir {folder}: no {OOF_FILE} (run `python train.py --cv_folds 5 ...` or "
                             "`bonebreak experiments --recipes baseline --cv 5` first)")
        paths, truth, probs, names = read_probabilities(file)
        if labels is not None and names != labels:
            raise ValueError(f"--cv_dir {folder}: its classes {names} differ from the other runs' {labels}")
        labels = names
        for path, label, row in zip(map(os.path.abspath, paths), truth, probs):  # one key per image however the folder was named
            sums[path] = sums.get(path, 0) + row
            seen[path] += 1
            given[path] = label
    counts = set(seen.values())
    if len(counts) > 1:
        raise ValueError(f"the CV runs do not score the same images the same number of times ({sorted(counts)}): "
                         "pass complete runs over the same data")
    paths = sorted(sums)
    return paths, [given[p] for p in paths], np.stack([sums[p] / seen[p] for p in paths]), labels or []


def fold_models(cv_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    return sorted(folder for cv in cv_dirs for folder in Path(cv).glob("fold*") if (folder / "config.json").is_file())


def test_probabilities(cv_dirs: Sequence[str | os.PathLike], data: LoadedData, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """The mean fold model's probabilities on a test split (no fold model saw Test)."""
    ensemble = load_ensemble(fold_models(cv_dirs), device="cpu")
    dataset = data.splits[split]
    truth = [data.labels[i] for i in dataset["label"]]
    members = [predict_dataset(member, dataset) for member in ensemble.members]
    return [os.path.abspath(p) for p in image_paths(dataset)], truth, np.mean(members, axis=0)


def conflicting_groups(paths: Sequence[str], given: Sequence[str], data: LoadedData) -> dict[str, tuple[str, list[str]]]:
    """path -> (group, the group's labels) for the images whose near-duplicate group carries more than one label."""
    if data.manifest is None:
        return {}
    group_of = {os.path.abspath(path): group for path, group in read_manifest_groups(data.manifest, data.root).items()}
    labels_of: dict[str, set[str]] = defaultdict(set)
    for split in data.splits.values():
        for path, label in zip(map(os.path.abspath, image_paths(split)), split["label"]):
            labels_of[group_of[path]].add(data.labels[label])
    result = {}
    for path in paths:
        group = group_of.get(path)
        if group is not None and len(labels_of[group]) > 1:
            result[path] = (group, sorted(labels_of[group]))
    return result


def score_labels(given: Sequence[str], probs: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's verdict per image (flagged or not) and its label quality score (low = likely wrong)."""
    index = np.array([labels.index(label) for label in given])
    missing = sorted(set(range(len(labels))) - set(index.tolist()))
    if missing:
        raise ValueError(f"no image is labelled {[labels[i] for i in missing]}: confident learning needs every class present")
    flagged = find_label_issues(labels=index, pred_probs=probs, filter_by="prune_by_noise_rate")
    return flagged, get_label_quality_scores(labels=index, pred_probs=probs, method="self_confidence")


def issue_rows(data: LoadedData, cv_dirs: Sequence[str | os.PathLike], test_split: str | None) -> list[dict[str, Any]]:
    """One row per scored image (Train out-of-fold, then the test split), lowest label quality first."""
    paths, given, probs, labels = out_of_fold(cv_dirs)
    splits = [str(Split.TRAIN)] * len(paths)
    if test_split:
        test_paths, test_given, test_probs = test_probabilities(cv_dirs, data, test_split)
        paths, given, probs = paths + test_paths, given + test_given, np.concatenate([probs, test_probs])
        splits += [test_split] * len(test_paths)
    flagged, quality = score_labels(given, probs, labels)
    conflicts = conflicting_groups(paths, given, data)
    rows = []
    for i, path in enumerate(paths):
        best = int(np.argmax(probs[i]))
        group, group_labels = conflicts.get(path, ("", []))
        rows.append({"path": relative_path(Path(path), Path(os.path.abspath(data.root))), "split": splits[i], "given_label": given[i],
                     "suggested_label": labels[best], "label_quality": round(float(quality[i]), 4),
                     "suggested_probability": round(float(probs[i, best]), 4), "flagged_by_cleanlab": bool(flagged[i]),
                     "conflicting_group": bool(group), "group": group, "group_labels": "|".join(group_labels)})
    return sorted(rows, key=lambda row: row["label_quality"])


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] = COLUMNS) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def contact_sheet(rows: Sequence[dict[str, Any]], root: Path, path: Path, count: int = 30, columns: int = 6, thumb: int = 150) -> Path | None:
    """The ``count`` lowest-quality flagged images, each captioned given -> suggested label and its quality."""
    thumbnails = [Thumbnail(root / row["path"], (f"{row['split']}  q={row['label_quality']:.2f}", f"given: {row['given_label'][:22]}",
                                                 f"model: {row['suggested_label'][:22]}"), highlight=1) for row in rows[:count]]
    return draw_contact_sheet(grid(thumbnails, columns), path, SheetLayout(thumb=thumb, columns=columns))


def label_issue_counts(rows: Sequence[dict[str, Any]], test_split: str | None, cv_dirs: Sequence[str],
              min_probability: float = MIN_PROBABILITY) -> dict[str, Any]:
    def count(split: str, keep: Any) -> int:
        return sum(1 for r in rows if r["split"] == split and keep(r))

    summary: dict[str, Any] = {"cv_runs": list(map(str, cv_dirs)), "test_split": test_split, "method": "cleanlab find_label_issues(prune_by_noise_rate), "
                               "label quality = self-confidence of out-of-fold probabilities", "min_probability": min_probability}
    for split in [str(Split.TRAIN)] + ([test_split] if test_split else []):
        n = sum(1 for r in rows if r["split"] == split)
        summary[split] = {"images": n, "flagged_by_cleanlab": count(split, lambda r: r["flagged_by_cleanlab"]),
                          "flagged_confidently": count(split, lambda r: confidently_flagged(r, min_probability)),
                          "in_conflicting_groups": count(split, lambda r: r["conflicting_group"]),
                          "flagged_by_either": count(split, lambda r: r["flagged_by_cleanlab"] or r["conflicting_group"])}
    if test_split and summary[test_split]["images"]:
        flagged, n = summary[test_split]["flagged_by_cleanlab"], summary[test_split]["images"]
        summary[test_split]["accuracy_ceiling_if_flags_are_wrong"] = round((n - flagged) / n, 3)
        summary[test_split]["accuracy_ceiling_if_strict_flags_are_wrong"] = round((n - summary[test_split]["flagged_confidently"]) / n, 3)
    pairs = Counter((r["given_label"], r["suggested_label"]) for r in rows if r["flagged_by_cleanlab"])
    summary["most_flagged_pairs"] = [{"given": g, "suggested": s, "images": c} for (g, s), c in pairs.most_common(8)]
    return summary


def format_summary(summary: dict[str, Any], test_split: str | None) -> str:
    lines = ["# Likely label errors", "", f"Method: {summary['method']}.", f"Out-of-fold probabilities from: {', '.join(summary['cv_runs'])}.", ""]
    for split in [str(Split.TRAIN)] + ([test_split] if test_split else []):
        s = summary[split]
        lines.append(f"- {split}: {s['flagged_by_cleanlab']} of {s['images']} labels flagged by cleanlab, {s['in_conflicting_groups']} in "
                     f"near-duplicate groups whose copies disagree, {s['flagged_by_either']} either; {s['flagged_confidently']} flagged with "
                     f"the models giving another label at least {summary['min_probability']:.2f} (the strict list).")
    if test_split and "accuracy_ceiling_if_flags_are_wrong" in summary[test_split]:
        lines.append(f"- If every flagged {test_split} label is wrong, a perfect model would score at most "
                     f"{summary[test_split]['accuracy_ceiling_if_flags_are_wrong']:.3f} top-1 on {test_split} as labelled "
                     f"({summary[test_split]['accuracy_ceiling_if_strict_flags_are_wrong']:.3f} if only the strict flags are).")
    lines += ["", "Most frequent flagged pairs (given label -> the models' label):", ""]
    lines += [f"- {p['given']} -> {p['suggested']}: {p['images']}" for p in summary["most_flagged_pairs"]]
    lines += ["", "Flags are candidates to review, not verdicts: the models are about 40% accurate, so many flags are model errors."]
    return "\n".join(lines) + "\n"


def confidently_flagged(row: dict[str, Any], min_probability: float) -> bool:
    """cleanlab flagged it and the fold models give the other label at least ``min_probability``: the strict threshold.

    With models about 40% accurate cleanlab flags close to half of Train; most of those flags are model errors,
    so the strict list (and relabelling, which trusts the models' label) keeps only the confident ones.
    """
    return bool(row["flagged_by_cleanlab"]) and row["suggested_probability"] >= min_probability


def write_label_issues(data: LoadedData, cv_dirs: Sequence[str], out_dir: str | os.PathLike, test_split: str | None = "auto",
                       min_probability: float = MIN_PROBABILITY) -> dict[str, Any]:
    """label_issues.csv (every scored image), exclude_*.csv / relabel_cleanlab.csv for training, contact_sheet.png, summary."""
    if not 0 < min_probability <= 1:
        raise ValueError(f"--min_probability must be in (0, 1], got {min_probability}")
    if test_split == "auto":
        test_split = str(Split.CLEAN_TEST) if Split.CLEAN_TEST in data.splits else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = issue_rows(data, cv_dirs, test_split)
    write_csv(rows, out / "label_issues.csv")
    train = [r for r in rows if r["split"] == Split.TRAIN]
    write_csv([r for r in train if r["flagged_by_cleanlab"]], out / "exclude_cleanlab.csv")
    write_csv([r for r in train if r["conflicting_group"]], out / "exclude_conflicting_groups.csv")
    confident = [r for r in train if confidently_flagged(r, min_probability)]
    write_csv(confident, out / "exclude_cleanlab_confident.csv")
    write_csv([{**r, "label": r["suggested_label"]} for r in confident], out / "relabel_cleanlab.csv", ("path", "label"))
    contact_sheet([r for r in rows if r["flagged_by_cleanlab"]], data.root, out / "contact_sheet.png")
    summary = label_issue_counts(rows, test_split, cv_dirs, min_probability)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(format_summary(summary, test_split))
    return summary
