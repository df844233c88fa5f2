"""ONNX Runtime on the CPU: run an exported network on a numpy batch, and load a checkpoint's ``model.onnx``
only when it was exported from the weights beside it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..common.checkpoint_format import EXPORT_COMMAND, ONNX_FILE, WEIGHTS_FILE, WEIGHTS_HASH_KEY
from ..common.files import file_sha256
from .checkpoint_info import weights_file

PREPROCESS_KEY = "bonebreak_preprocess"  # metadata of xray_check.onnx: the preprocessing its input expects (JSON)


class OnnxUnavailable(RuntimeError):
    """The ONNX copy cannot be used for this checkpoint (the message says why and what to run)."""


class OnnxForward:
    """An ONNX Runtime CPU session over a float32 pixel batch: ``forward(pixels)`` returns every output by name.

    ``source`` is a file or the serialised model bytes; ``threads`` sets ONNX Runtime's intra-op threads
    (default: one per core).
    """

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort  # lazy: only this backend needs it, and importing it takes a while
        except ImportError as error:
            raise OnnxUnavailable("onnxruntime is not installed: pip install -r requirements.txt") from error
        options = ort.SessionOptions()
        # Idle ORT threads otherwise spin for a while after each run and starve whatever runs next on a 2-core CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                            providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.description = "ONNX Runtime (CPU)"

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        results = self.session.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})
        return dict(zip(self.output_names, results))


def weights_stamp(checkpoint: str | os.PathLike) -> str | None:
    """SHA-256 of the weights a checkpoint's ONNX copy must have been exported from; None when the folder holds
    no weights (an exported Space ships the ONNX copy alone, so there is nothing it could be stale against)."""
    path = weights_file(checkpoint)
    return None if path is None else file_sha256(path)


def served_weights_stamp(checkpoint: str | os.PathLike, forward: object) -> str | None:
    """The weights a checkpoint serves with ``forward``: the hash of the weights beside it, else the stamp of the ONNX
    copy that stands in for them. What files derived from the weights (the similar-cases index) are checked against."""
    return weights_stamp(checkpoint) or getattr(forward, "metadata", {}).get(WEIGHTS_HASH_KEY)


def load_classifier_onnx(checkpoint: str | os.PathLike) -> OnnxForward:
    """The checkpoint's ``model.onnx``, refused when missing, unreadable or exported from other weights."""
    checkpoint = Path(checkpoint)
    path = checkpoint / ONNX_FILE
    fix = f"run `{EXPORT_COMMAND.format(checkpoint)}`"
    if not path.is_file():
        raise OnnxUnavailable(f"{path} not found: {fix}")
    try:
        runner = OnnxForward(path)
    except OnnxUnavailable:
        raise
    except Exception as error:  # ORT raises its own types for truncated or foreign files
        raise OnnxUnavailable(f"{path} cannot be loaded ({error}): {fix}") from error
    stamp = weights_stamp(checkpoint)
    if stamp is not None and runner.metadata.get(WEIGHTS_HASH_KEY) != stamp:
        raise OnnxUnavailable(f"{path} was exported from different weights than {checkpoint / WEIGHTS_FILE}: {fix}")
    if "logits" not in runner.output_names:
        raise OnnxUnavailable(f"{path} has no 'logits' output (outputs: {runner.output_names}): {fix}")
    return runner
