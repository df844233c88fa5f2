"""The names inside a checkpoint folder, in one place: what training writes and serving reads.

A checkpoint folder holds the transformers model (``config.json`` + ``model.safetensors``, and
``preprocessor_config.json`` for non-timm models), its ONNX copy, the X-ray check (its reference
embeddings and its network as ONNX), the similar-cases index, reports and the model card.
"""

from __future__ import annotations

SHIPPED_MODEL = "checkpoints/bone_break_model"  # the committed checkpoint every command serves by default

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
XRAY_CHECK_FILE = "xray_check.safetensors"  # reference embeddings of training X-rays and the threshold
XRAY_CHECK_ONNX = "xray_check.onnx"  # the generic ImageNet network that embeds an image for the X-ray check
SIMILAR_CASES_FILE = "similar_cases.safetensors"  # labelled training X-rays to show beside an answer (serving/similar_cases.py)
METRICS_FILE = "metrics.json"
CALIBRATION_FILE = "calibration.json"
ENSEMBLE_FILE = "ensemble.json"  # an ensemble checkpoint lists its members here
MEMBERS_DIR = "members"

# config.json keys written by training
TEMPERATURE_KEY = "bonebreak_temperature"  # applied by the Predictor; 1.0 once folded into the head
FOLDED_KEY = "bonebreak_temperature_folded"  # the temperature already divided into the head's weights
EQUALIZE_KEY = "bonebreak_equalize"  # histogram-equalise before resizing (a training choice)

# model.onnx metadata and outputs
WEIGHTS_HASH_KEY = "bonebreak_weights_sha256"  # the weights the ONNX copy was exported from
LOGITS, CLASS_MAPS, EMBEDDING = "logits", "class_maps", "embedding"  # ONNX output names

EXPORT_COMMAND = "bonebreak export --model_path {}"


class ModelLoadError(ValueError):
    """A model or checkpoint cannot be built or loaded; the message names the fix."""
