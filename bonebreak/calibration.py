"""Calibrated probabilities, fitted on validation.

* Temperature scaling: one scalar T fitted on validation logits (NLL), folded into the
  classifier head (``fold_temperature``) or kept in the config as ``bonebreak_temperature``;
  ECE and a reliability diagram before/after.
* The "fit on validation" steps (``calibrate_predictor``, ``fit_calibration``), which also fit
  the X-ray check of ``bonebreak.ood``. They take any object with ``logits(images)`` and
  ``model`` (a ``Predictor``), so this module does not depend on the inference layer.

``python -m bonebreak.calibrate`` (re)calibrates a saved checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .models import classifier_head
from .ood import DEFAULT_EMBEDDING, OOD_QUANTILE, ImageEmbedder, OODDetector

logger = logging.getLogger(__name__)

TEMPERATURE_KEY = "bonebreak_temperature"  # applied by Predictor at inference; 1.0 once folded into the head
FOLDED_KEY = "bonebreak_temperature_folded"  # the temperature already divided into the head's weights


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
    """Divide the classifier head by ``temperature`` so that every loader gets calibrated logits.

    softmax(W x / T + b / T) is the calibrated distribution, so a model saved this way gives
    the app's probabilities through ``pipeline()`` and ``AutoModelForImageClassification`` too.
    A head that is not one final linear layer keeps the temperature in the config instead
    (Predictor applies it), and False is returned.
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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=-1).numpy()


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_diagram(curves: dict[str, np.ndarray], labels: np.ndarray, path: str | Path, bins: int = 10) -> Path:
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy and only training draws this; no pyplot, no display

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, probs in curves.items():
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        xs, ys = [], []
        for low, high in zip(edges[:-1], edges[1:]):
            in_bin = (confidence > low) & (confidence <= high)
            if in_bin.any():
                xs.append(confidence[in_bin].mean())
                ys.append(correct[in_bin].mean())
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {expected_calibration_error(probs, labels, bins):.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on validation")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def calibrate_predictor(raw: Any, train_images: Sequence[str], val_images: Sequence[str], val_labels: Sequence[int], out_dir: Path) -> dict[str, Any]:
    """Fit temperature and the X-ray check for an uncalibrated ``Predictor``'s model.

    Writes ``ood.safetensors``, ``calibration.json`` and the reliability diagram to ``out_dir``
    and records the temperature in the model's config (saved with the model).
    """
    val_logits = raw.logits(list(val_images))
    embed = ImageEmbedder(embedding=DEFAULT_EMBEDDING)
    result = fit_calibration(val_logits, embed(list(val_images)), embed(list(train_images)), np.asarray(val_labels), Path(out_dir),
                             embedding=DEFAULT_EMBEDDING)
    raw.model.config.update({TEMPERATURE_KEY: result["temperature"]})
    return result


def fit_calibration(val_logits: np.ndarray, val_embeddings: np.ndarray, train_embeddings: np.ndarray, val_labels: np.ndarray, out_dir: Path,
                    embedding: str = DEFAULT_EMBEDDING) -> dict[str, Any]:
    """Temperature and the X-ray check; the embeddings must be of kind ``embedding`` (a key of ``bonebreak.ood.EMBEDDINGS``)."""
    temperature = fit_temperature(val_logits, val_labels)
    before, after = softmax(val_logits), softmax(val_logits, temperature)
    reliability_diagram({"before (T=1)": before, f"after (T={temperature:.2f})": after}, val_labels, out_dir / "reliability_validation.png")
    detector = OODDetector.fit(train_embeddings, val_embeddings, embedding=embedding)
    detector.save(out_dir)
    result = {
        "temperature": temperature,
        "validation_ece_before": expected_calibration_error(before, val_labels),
        "validation_ece_after": expected_calibration_error(after, val_labels),
        "ood_threshold": detector.threshold,
        "ood_quantile": OOD_QUANTILE,
        "ood_embedding": embedding,
    }
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2))
    logger.info("temperature %.3f, validation ECE %.3f -> %.3f", temperature, result["validation_ece_before"], result["validation_ece_after"])
    return result
