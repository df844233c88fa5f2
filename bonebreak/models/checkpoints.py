"""Checkpoint folders: written atomically (a crash leaves the old folder or the new one), loaded from
safetensors only, with a message naming the missing or damaged file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageClassification, PreTrainedModel
from transformers.models.timm_wrapper.image_processing_timm_wrapper import TimmWrapperImageProcessor

from ..common.checkpoint_format import CONFIG_FILE, WEIGHTS_FILE, ModelLoadError
from .factory import ModelAndProcessor, load_image_processor


def save_checkpoint(
    model: PreTrainedModel,
    processor: Any,
    path: str | os.PathLike,
    extra_files: dict[str, str | bytes] | None = None,
    extra_dirs: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write model, processor and extras to ``path`` so that it is never seen half-written.

    Everything goes to a temporary sibling folder first, which then replaces ``path`` with
    two renames; a crash leaves either the old checkpoint or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.saving-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if not isinstance(processor, TimmWrapperImageProcessor):  # timm keeps it inside config.json
            processor.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        for name, source in (extra_dirs or {}).items():
            shutil.copytree(source, staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> ModelAndProcessor:
    """Load a checkpoint folder (safetensors only); a missing or bad file is named in the error."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"checkpoint folder {path} not found: train one with `python train.py --output_dir {path}` "
            "or pass --model_path to an existing checkpoint"
        )
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: {CONFIG_FILE} is missing, this is not a complete checkpoint")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file} is corrupt ({error})") from error
    if not (path / WEIGHTS_FILE).is_file() and not (path / f"{WEIGHTS_FILE}.index.json").is_file():
        raise ModelLoadError(
            f"{path}: {WEIGHTS_FILE} is missing (only safetensors weights are loaded, never pickles)"
        )
    try:
        model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        processor = load_image_processor(path, model.config.model_type)
    except Exception as error:  # safetensors, json and shape errors all mean the same to a user
        raise ModelLoadError(f"{path}: checkpoint cannot be loaded, {path / WEIGHTS_FILE} or {CONFIG_FILE} is damaged or mismatched ({error})") from error
    model.eval()
    return model, processor
