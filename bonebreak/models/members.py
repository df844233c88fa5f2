"""Ensemble checkpoints: a checkpoint folder may carry member models in ``members/<name>/``, listed in its
``ensemble.json`` (``bonebreak add-member`` adds one).

Served (``bonebreak.serving.loader.load_classifier``), the folder answers with the mean of its own and its
members' calibrated probabilities; ``pipeline()`` and ``AutoModelForImageClassification`` still load the
folder's own model only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..common.checkpoint_format import (CALIBRATION_FILE, CONFIG_FILE, ENSEMBLE_FILE, MEMBERS_DIR, METRICS_FILE, ONNX_FILE,
                                        PREPROCESSOR_FILE, WEIGHTS_FILE, ModelLoadError)
from ..serving.checkpoint_info import ensemble_members, labels_of
from .checkpoints import load_checkpoint

# What a member needs to serve: weights, config, its ONNX copy and the record of how it was trained.
MEMBER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, ONNX_FILE, CALIBRATION_FILE, METRICS_FILE, "README.md")


def add_ensemble_member(path: str | os.PathLike, member: str | os.PathLike, name: str | None = None) -> Path:
    """Copy the serving files of checkpoint ``member`` into ``path``/members/NAME and list it in ensemble.json.

    Both must classify the same labels in the same order; a member may not be an ensemble itself.
    NAME defaults to the member's model name from its metrics.json (else its folder name).
    """
    path, member = Path(path), Path(member)
    own, theirs = _checkpoint_labels(path), _checkpoint_labels(member)
    if own != theirs:
        raise ModelLoadError(f"{member} classifies {theirs}, but {path} classifies {own}: ensemble members must share one label list")
    if ensemble_members(member):
        raise ModelLoadError(f"{member} is an ensemble itself: add its members one by one")
    metrics = json.loads((member / METRICS_FILE).read_text()) if (member / METRICS_FILE).is_file() else {}
    name = name or str(metrics.get("model") or member.name).replace("/", "_")
    relative = f"{MEMBERS_DIR}/{name}"
    listed = [folder.relative_to(path).as_posix() for folder in ensemble_members(path)]
    if relative in listed:
        raise ModelLoadError(f"{path} already has a member named '{name}': pass another name")
    target = path / relative
    staging = target.parent / f".{name}.adding-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for file in MEMBER_FILES:
            if (member / file).is_file():
                shutil.copy2(member / file, staging / file)
        load_checkpoint(staging)  # refuse a damaged member before listing it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)  # left by an earlier attempt that never listed it
    os.replace(staging, target)
    (path / ENSEMBLE_FILE).write_text(json.dumps({"members": listed + [relative]}, indent=2) + "\n")
    return target


def _checkpoint_labels(path: Path) -> list[str]:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: {CONFIG_FILE} is missing, this is not a checkpoint folder")
    return labels_of(json.loads(config_file.read_text()))
