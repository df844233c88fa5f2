"""Bring a saved checkpoint's metrics.json and model card up to date: re-evaluate it (or reuse its reports) on the
splits it was trained with, with the members of an ensemble checkpoint (``bonebreak model-card``, ``add-member``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..common.checkpoint_format import CALIBRATION_FILE, METRICS_FILE, SIMILAR_CASES_FILE
from ..data.layouts import resolve_data_dir
from ..data.loading import load_splits_as_trained
from ..data.splits import EVALUATION_SPLITS
from ..models.torch_backend import load_classifier
from ..serving.checkpoint_info import ensemble_members
from .model_card import render
from .reports import evaluate_splits, record_results

MEMBER_KEYS = ("arguments", "precision", "train_seconds", "validation", "clean_test", "test")


def evaluate_checkpoint(folder: Path, summary: dict[str, Any], data_dir: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Evaluate a saved checkpoint (with its ensemble members) on the splits it was trained with, into its eval_<split>/ folders."""
    data = load_splits_as_trained(summary["arguments"], resolve_data_dir(data_dir))
    names = [str(name) for name in EVALUATION_SPLITS if name in data.splits]
    return evaluate_splits(load_classifier(folder), data.splits, data.labels, names, lambda name: folder / f"eval_{name}")


def ensemble_summary(folder: Path) -> dict[str, Any] | None:
    """What the card says of a checkpoint's member models: each one's recipe and its own scores (None: a single model)."""
    members = []
    for member in ensemble_members(folder):
        own = json.loads((member / METRICS_FILE).read_text()) if (member / METRICS_FILE).is_file() else {}
        members.append({"path": member.relative_to(folder).as_posix(), "model": own.get("model", member.name),
                        **{key: own[key] for key in MEMBER_KEYS if key in own}})
    return {"combine": "mean of the members' calibrated probabilities", "members": members} if members else None


def refresh_card(folder: str | Path, data_dir: str | None = None, reuse_reports: bool = False, cv_report: str | None = None) -> Path:
    """Re-evaluate a saved checkpoint (or reuse its eval_*/ reports) and rewrite its metrics.json and model card."""
    folder = Path(folder)
    summary = json.loads((folder / METRICS_FILE).read_text())
    if reuse_reports:
        reports = {str(name): json.loads((folder / f"eval_{name}" / METRICS_FILE).read_text())
                   for name in EVALUATION_SPLITS if (folder / f"eval_{name}" / METRICS_FILE).is_file()}
        xray_check = None  # keep the recorded X-ray check
    else:
        reports, xray_check = evaluate_checkpoint(folder, summary, data_dir)
    record_results(summary, reports, xray_check)
    if (folder / CALIBRATION_FILE).is_file():
        summary["calibration"] = json.loads((folder / CALIBRATION_FILE).read_text())
    if cv_report:
        summary["cv"] = json.loads(Path(cv_report).read_text())
    summary["similar_cases"] = (folder / SIMILAR_CASES_FILE).is_file()  # the card lists what the folder ships
    summary.pop("ensemble", None)
    if (ensemble := ensemble_summary(folder)) is not None:
        summary["ensemble"] = ensemble
    (folder / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    card = folder / "README.md"
    card.write_text(render(summary, reports))
    return card
