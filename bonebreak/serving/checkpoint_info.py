"""What serving needs to know about a checkpoint folder, read from its JSON files (no model library needed):
the labels, the preprocessing, the temperature, and the members of an ensemble checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.checkpoint_format import (CONFIG_FILE, ENSEMBLE_FILE, MEMBERS_DIR, ONNX_FILE, PREPROCESSOR_FILE, TEMPERATURE_KEY, WEIGHTS_FILE,
                                        ModelLoadError)
from ..data.preprocess import PreprocessConfig, preprocess_config


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    labels: list[str]
    preprocess: PreprocessConfig
    temperature: float  # 1.0 once folded into the head (as training does)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is corrupt ({error})") from error


def labels_of(config: dict[str, Any]) -> list[str]:
    """The class names in output order: transformers' id2label, or the timm wrapper's label_names."""
    if config.get("id2label"):
        id2label = config["id2label"]
        return [id2label[key] for key in sorted(id2label, key=int)]
    if config.get("label_names"):
        return list(config["label_names"])
    raise ModelLoadError("config.json names no labels (neither id2label nor label_names)")


def weights_file(path: str | os.PathLike) -> Path | None:
    """The folder's safetensors weights: the one file, else the index that names every shard; None when the folder
    holds only their ONNX copy (an exported Space)."""
    single = Path(path) / WEIGHTS_FILE
    for candidate in (single, single.with_name(f"{WEIGHTS_FILE}.index.json")):
        if candidate.is_file():
            return candidate
    return None


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint folder's labels, preprocessing and temperature; a missing folder or file is named in the error."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint folder {path} not found: train one with `bonebreak train --output_dir {path}` "
                             "or pass --model_path to an existing checkpoint")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: {CONFIG_FILE} is missing, this is not a complete checkpoint")
    if weights_file(path) is None and not (path / ONNX_FILE).is_file():  # an exported Space serves model.onnx alone
        raise ModelLoadError(f"{path}: {WEIGHTS_FILE} is missing (only safetensors weights are loaded, never pickles)")
    config = _read_json(config_file)
    processor = _read_json(path / PREPROCESSOR_FILE) if (path / PREPROCESSOR_FILE).is_file() else None
    try:
        preprocess = preprocess_config(processor, config)
    except ValueError as error:
        raise ModelLoadError(f"{path}: {error}") from error
    return CheckpointInfo(path, labels_of(config), preprocess, float(config.get(TEMPERATURE_KEY) or 1.0))


def ensemble_members(path: str | os.PathLike) -> list[Path]:
    """The member checkpoint folders listed in ``path``/ensemble.json besides the folder's own model ([]: a single model)."""
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
                                 f"add members with `bonebreak add-member --model_path {path} --member FOLDER`")
        folders.append(folder)
    return folders
