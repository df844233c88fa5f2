"""Calibrated probabilities and the X-ray check, both fitted on validation.

* Temperature scaling: one scalar T fitted on validation logits (NLL), folded into the classifier head
  (``fold_temperature``) or kept in the config as ``bonebreak_temperature``; ECE before and after, and a
  reliability diagram.
* The X-ray check (``bonebreak.serving.xray_check``): reference embeddings of the training X-rays and the
  99th-percentile threshold of validation distances, computed with the same ONNX network serving runs.

``calibrate_model`` does both for a trained model (training's last step, and ``bonebreak calibrate`` for a saved one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..common.checkpoint_format import CALIBRATION_FILE, FOLDED_KEY, TEMPERATURE_KEY, XRAY_CHECK_ONNX
from ..models.factory import classifier_head, preprocess_config_of
from ..models.onnx_export import export_xray_check
from ..models.torch_backend import TorchForward
from ..serving.checkpoint_info import labels_of
from ..serving.predictor import Predictor, softmax
from ..serving.xray_check import LEGACY_FILE, QUANTILE, XrayCheck, XrayEmbedder
from .metrics import expected_calibration_error
from .plots import reliability_diagram

logger = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fold_temperature(model: Any, temperature: float) -> bool:
    """Divide the classifier head (weights and bias) by ``temperature`` so that every loader gets calibrated logits.

    softmax(W x / T + b / T) is the calibrated distribution, so a model saved this way gives the app's
    probabilities through ``pipeline()`` and ``AutoModelForImageClassification`` too. A head that is not
    one final linear layer keeps the temperature in the config instead (the Predictor applies it), and
    False is returned.
    """
    config = model.config
    head = classifier_head(model)
    if head is None:
        logger.warning("no final linear head to fold the temperature into: it stays in config.%s (pipeline() users "
                       "get uncalibrated probabilities)", TEMPERATURE_KEY)
        config.update({TEMPERATURE_KEY: temperature})
        return False
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    config.update({TEMPERATURE_KEY: 1.0, FOLDED_KEY: float(getattr(config, FOLDED_KEY, None) or 1.0) * temperature})
    return True


def fit_calibration(raw: Predictor, train_images: Sequence[str], val_images: Sequence[str], val_labels: Sequence[int],
                    embedder: XrayEmbedder, out_dir: str | Path) -> dict[str, Any]:
    """Fit the temperature of an uncalibrated ``raw`` Predictor and the X-ray check, on validation.

    Writes ``xray_check.safetensors``, ``calibration.json`` and the reliability diagram to ``out_dir`` and
    returns what calibration.json holds; the caller folds the temperature into the model (``fold_temperature``).
    """
    out_dir = Path(out_dir)
    labels = np.asarray(val_labels)
    val_logits = raw.logits(list(val_images))
    temperature = fit_temperature(val_logits, labels)
    before, after = softmax(val_logits), softmax(val_logits, temperature)
    reliability_diagram({"before (T=1)": before, f"after (T={temperature:.2f})": after}, labels, out_dir / "reliability_validation.png")
    check = XrayCheck.fit(embedder(list(train_images)), embedder(list(val_images)), embedder=embedder)
    check.save(out_dir)
    result = {
        "temperature": temperature,
        "validation_ece_before": expected_calibration_error(before, labels),
        "validation_ece_after": expected_calibration_error(after, labels),
        "xray_check_threshold": check.threshold,
        "xray_check_quantile": QUANTILE,
    }
    (out_dir / CALIBRATION_FILE).write_text(json.dumps(result, indent=2))
    logger.info("temperature %.3f, validation ECE %.3f -> %.3f", temperature, result["validation_ece_before"], result["validation_ece_after"])
    return result


def calibrate_model(model: Any, processor: Any, train_images: Sequence[str], val_images: Sequence[str], val_labels: Sequence[int],
                    out_dir: str | Path) -> tuple[Predictor, dict[str, Any]]:
    """Calibrate a PyTorch classifier in memory, writing the X-ray check (network and references) to ``out_dir``.

    The temperature is folded into the classifier head (``fold_temperature``), so ``pipeline()`` and
    ``AutoModelForImageClassification`` users get the same calibrated probabilities as the app. Returns the
    calibrated Predictor (PyTorch forward, X-ray check on) and what calibration.json holds.
    """
    out_dir = Path(out_dir)
    export_xray_check(out_dir)
    labels = labels_of(model.config.to_dict())
    preprocess = preprocess_config_of(model, processor)
    forward = TorchForward(model)
    raw = Predictor(labels, preprocess, forward)
    result = fit_calibration(raw, train_images, val_images, val_labels, XrayEmbedder(out_dir / XRAY_CHECK_ONNX), out_dir)
    result["temperature_folded_into_head"] = fold_temperature(model, result["temperature"])
    (out_dir / CALIBRATION_FILE).write_text(json.dumps(result, indent=2))
    (out_dir / LEGACY_FILE).unlink(missing_ok=True)  # superseded by xray_check.safetensors
    calibrated = Predictor(labels, preprocess, forward, temperature=float(getattr(model.config, TEMPERATURE_KEY, 1.0)),
                           xray_check=XrayCheck.load(out_dir), grad_cam=forward.grad_cam)
    return calibrated, result
