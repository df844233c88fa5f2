"""Load a checkpoint folder for serving: pick the engine (``--backend``), read the labels, preprocessing and
temperature, the X-ray check, and the members of an ensemble checkpoint.

``backend``: "onnx" (the checkpoint's ``model.onnx``; an error names the export command when it is missing or
stale), "torch" (PyTorch, which the caller provides as ``torch_forward``: serving itself never imports it) or
"auto" (ONNX when usable, else PyTorch when provided).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from ..common.checkpoint_format import CLASS_MAPS, ModelLoadError
from ..data.decode import DEFAULT_LIMITS, DecodeLimits
from .checkpoint_info import ensemble_members, read_checkpoint_info
from .ensemble import Ensemble
from .onnx_runtime import OnnxUnavailable, load_classifier_onnx, served_weights_stamp
from .predictor import DEFAULT_UNSURE_BELOW, Forward, Predictor
from .similar_cases import CaseIndex
from .xray_check import XrayCheck

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
BACKEND_HELP = ("auto (ONNX Runtime on CPU when the checkpoint has an up-to-date model.onnx, else PyTorch), torch (needs the "
                "training stack: pip install -r requirements.txt) or onnx.")
NO_TORCH = "PyTorch is not installed here (a serving-only install); pip install -r requirements.txt for the full stack"

TorchForwardFactory = Callable[[Path], Forward]  # checkpoint folder -> its PyTorch forward (with a .grad_cam)
Classifier = Predictor | Ensemble  # what a checkpoint folder serves


def check_backend(backend: str) -> str:
    """The --backend value, or a ValueError naming the flag and its choices."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    return backend


def choose_forward(path: Path, backend: str, torch_forward: TorchForwardFactory | None) -> Forward:
    """The engine ``backend`` asks for; ValueError saying why and what to do when it cannot be had."""
    check_backend(backend)
    if backend == "torch":
        if torch_forward is None:
            raise ValueError(f"--backend torch: {NO_TORCH}")
        return torch_forward(path)
    try:
        return load_classifier_onnx(path)
    except OnnxUnavailable as error:
        if backend == "onnx" or torch_forward is None:
            hint = "" if backend == "onnx" else f" ({NO_TORCH})"
            raise ValueError(f"{error}{hint}") from error
        logger.info("using PyTorch, not ONNX Runtime: %s", error)
        return torch_forward(path)


def load_cases(path: Path, stamp: str | None) -> CaseIndex | None:
    """The folder's similar cases; a stale index (built from other weights) is left out with a warning naming the fix,
    as a stale ONNX copy is: the model still answers, only without cases."""
    try:
        return CaseIndex.load(path, stamp)
    except ModelLoadError as error:
        logger.warning("serving without similar cases: %s", error)
        return None


def load_predictor(path: str | os.PathLike, backend: str = "auto", torch_forward: TorchForwardFactory | None = None,
                   xray_check: bool = True, calibrated: bool = True, limits: DecodeLimits = DEFAULT_LIMITS,
                   unsure_below: float = DEFAULT_UNSURE_BELOW, similar_cases: bool = True) -> Predictor:
    """One checkpoint folder's own model as a ``Predictor`` (an ensemble checkpoint's members are left out).

    ``calibrated=False`` leaves the temperature out (what fitting one needs); ``xray_check=False`` the X-ray check;
    ``similar_cases=False`` the similar-cases index.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    forward = choose_forward(path, backend, torch_forward)
    grad_cam = getattr(forward, "grad_cam", None)
    if grad_cam is None and CLASS_MAPS not in getattr(forward, "output_names", ()) and torch_forward is not None:
        grad_cam = torch_forward(path).grad_cam  # ONNX has no class maps for this head: Grad-CAM needs PyTorch
    stamp = served_weights_stamp(path, forward)  # the index must come from the weights serving now
    predictor = Predictor(info.labels, info.preprocess, forward, temperature=info.temperature if calibrated else 1.0,
                          xray_check=XrayCheck.load(path) if xray_check else None, grad_cam=grad_cam, limits=limits,
                          unsure_below=unsure_below, similar_cases=load_cases(path, stamp) if similar_cases else None)
    logger.info("%s: %s", path, predictor.description)
    return predictor


def load_classifier(path: str | os.PathLike, backend: str = "auto", torch_forward: TorchForwardFactory | None = None,
                    limits: DecodeLimits = DEFAULT_LIMITS, unsure_below: float = DEFAULT_UNSURE_BELOW) -> Classifier:
    """What a checkpoint folder serves: its model, or the ensemble of its model and the members its ensemble.json lists."""
    own = load_predictor(path, backend, torch_forward, limits=limits, unsure_below=unsure_below)
    members = [load_predictor(member, backend, torch_forward, xray_check=False, limits=limits, unsure_below=unsure_below, similar_cases=False)
               for member in ensemble_members(path)]
    return Ensemble([own, *members]) if members else own


def load_ensemble(folders: list[str | os.PathLike], backend: str = "auto", torch_forward: TorchForwardFactory | None = None) -> Ensemble:
    """Several checkpoint folders (fold models, distillation teachers) as one ``Ensemble``, without X-ray checks."""
    if not folders:
        raise ValueError("an ensemble needs at least one checkpoint folder")
    return Ensemble([load_predictor(folder, backend, torch_forward, xray_check=False, similar_cases=False) for folder in folders])

