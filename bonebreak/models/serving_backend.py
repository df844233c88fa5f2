"""How the commands load what a checkpoint serves: with PyTorch as a backend where it is installed, and on
ONNX Runtime alone where it is not (a serving-only install, e.g. a Space), so no command requires the
training stack to answer."""

from __future__ import annotations

import importlib.util
import os

from ..data.decode import DEFAULT_LIMITS, DecodeLimits
from ..serving import loader
from ..serving.predictor import DEFAULT_UNSURE_BELOW


def load_served(path: str | os.PathLike, backend: str = "auto", device: str | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
                unsure_below: float = DEFAULT_UNSURE_BELOW) -> loader.Classifier:
    """The checkpoint folder's model (or ensemble), on the engine ``--backend`` asks for."""
    loader.check_backend(backend)
    if importlib.util.find_spec("torch") is None:
        if device and device != "cpu":
            raise ValueError(f"--device {device}: {loader.NO_TORCH}")
        return loader.load_classifier(path, backend, None, limits, unsure_below)
    from .torch_backend import load_classifier  # the full stack: PyTorch serves where ONNX cannot

    return load_classifier(path, backend, device, limits, unsure_below)
