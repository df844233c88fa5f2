"""Ensemble checkpoints: a checkpoint folder may carry partner models in ``members/<name>/``, listed
in its ``ensemble.json``.

Served (``Predictor.from_checkpoint``), the folder's prediction is the mean of its own and its
partners' calibrated probabilities; ``pipeline()`` and ``AutoModelForImageClassification`` still
load the folder's own model only. ``python -m bonebreak.add_member`` adds a partner.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .models import CONFIG_FILE, ModelLoadError, load_checkpoint

ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
# What a partner needs to serve: weights, config, its ONNX copy and the record of how it was trained.
MEMBER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "model.onnx", "calibration.json", "metrics.json", "README.md")


def ensemble_members(path: str | os.PathLike) -> list[Path]:
    """The partner checkpoint folders listed in ``path``/ensemble.json ([] for a single model)."""
    path = Path(path)
    manifest = path / ENSEMBLE_FILE
    if not manifest.is_file():
        return []
    try:
        names = json.loads(manifest.read_text())["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{manifest} is damaged: expected {{\"members\": [\"{MEMBERS_DIR}/NAME\", ...]}} ({error})") from error
    folders = []
    for name in names:
        folder = path / str(name)
        if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts or not (folder / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{manifest} lists '{name}', which is not a checkpoint folder inside {path}: "
                                 f"add partners with `python -m bonebreak.add_member --model_path {path} --member FOLDER`")
        folders.append(folder)
    return folders


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
    metrics = json.loads((member / "metrics.json").read_text()) if (member / "metrics.json").is_file() else {}
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
    id2label = json.loads(config_file.read_text()).get("id2label", {})
    return [id2label[key] for key in sorted(id2label, key=int)]
