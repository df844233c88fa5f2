"""Heat maps: where the model looked, as a 0..1 map over the picture it saw, and that map drawn over the picture.

For a head that global-average-pools the last feature map and applies one linear layer, Grad-CAM equals
the class activation map relu(sum_c w[class, c] * features[c]), which ``model.onnx`` returns for every class
(``class_maps``): so the map comes from the same forward pass as the prediction. Other heads get Grad-CAM
from the PyTorch backend (``bonebreak.models.torch_backend``). numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

# matplotlib's "jet" colour map (its segment data), as a 256-entry table: indexing it costs nothing per request
_JET = {"red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0))}
JET_COLOURS = (np.stack([np.interp(np.linspace(0.0, 1.0, 256), *zip(*_JET[channel])) for channel in ("red", "green", "blue")], axis=1)
               * 255).astype(np.uint8)


def class_activation_map(class_map: np.ndarray) -> np.ndarray:
    """CAM from one class's map (``class_maps[image, class]``: the head applied at every position): its positive part."""
    return np.maximum(np.asarray(class_map, dtype=np.float64), 0.0)


def upsample(cam: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A feature-resolution map resized to the model's input and scaled to 0..1.

    Bilinear with half-pixel centres, exactly as ``torch.nn.functional.interpolate(...,
    align_corners=False)``, in numpy: a few small matrix products, no thread pool to wake.
    """
    resized = _bilinear(size[0], cam.shape[0]) @ np.asarray(cam, dtype=np.float64) @ _bilinear(size[1], cam.shape[1]).T
    top = float(resized.max())
    return (resized / top if top > 0 else resized).astype(np.float32)


def _bilinear(out: int, size: int) -> np.ndarray:
    """The (out, size) matrix of 1-D bilinear interpolation weights (source index clamped at 0 and size - 1)."""
    source = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    low = np.minimum(source.astype(int), size - 1)
    high = np.minimum(low + 1, size - 1)
    matrix = np.zeros((out, size))
    np.add.at(matrix, (np.arange(out), low), 1.0 - (source - low))
    np.add.at(matrix, (np.arange(out), high), source - low)
    return matrix


def overlay_heatmap(view: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a 0..1 heat map (jet colours) over the picture the model saw."""
    colours = JET_COLOURS[np.clip(np.rint(np.asarray(heatmap) * 255), 0, 255).astype(np.uint8)]
    return Image.blend(view.convert("RGB"), Image.fromarray(colours).resize(view.size), alpha)
