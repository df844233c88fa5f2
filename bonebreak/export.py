"""ONNX export and the ONNX Runtime forward pass: ``python -m bonebreak.export --onnx``.

The exported graph maps ``pixel_values`` (batch, 3, H, W; batch is dynamic) to ``logits``;
decoding and preprocessing stay in Python (``bonebreak.transforms``), so the ONNX model
is fed exactly what the PyTorch one is. The file records the SHA-256 of the weights it
came from: a checkpoint retrained after export is detected and not served stale.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import parse
from .models import SHIPPED_MODEL, WEIGHTS_FILE, ModelLoadError, load_checkpoint

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
WEIGHTS_HASH_KEY = "bonebreak_weights_sha256"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4  # largest allowed softmax probability difference to PyTorch


class OnnxUnavailable(RuntimeError):
    """The ONNX backend cannot be used for this checkpoint (the message says why and what to run)."""


def weights_sha256(checkpoint: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():  # sharded weights: the index names every shard's tensors
        path = path.with_name(f"{WEIGHTS_FILE}.index.json")
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _LogitsOnly(torch.nn.Module):
    """The classifier as pixels -> logits tensor (ONNX graphs return tensors, not ModelOutputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class OnnxForward:
    """An ONNX Runtime CPU session that maps a pixel batch to its one output, like the PyTorch model.

    ``source`` is a file or, for graphs exported on the fly, the serialised model bytes.
    """

    def __init__(self, source: str | os.PathLike | bytes) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise OnnxUnavailable("onnxruntime is not installed: pip install -r requirements.txt") from error
        options = ort.SessionOptions()
        # Idle ORT threads otherwise spin for a while after each run and starve the PyTorch work
        # that follows (Grad-CAM, the X-ray check): measured 15 ms instead of 1.3 ms for a conv
        # right after a run, against 3.8 instead of 3.1 ms per ORT run without spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (output,) = self.session.run(None, {"pixel_values": pixels.detach().cpu().float().numpy()})
        return torch.from_numpy(output)


def _export(module: torch.nn.Module, target: str | os.PathLike | io.BytesIO, size: int, output: str, opset: int = DEFAULT_OPSET) -> None:
    torch.onnx.export(
        module.eval(), (torch.zeros(1, 3, size, size),), target if isinstance(target, io.BytesIO) else str(target),
        input_names=["pixel_values"], output_names=[output], dynamic_axes={"pixel_values": {0: "batch"}, output: {0: "batch"}},
        opset_version=opset,
        dynamo=False,  # the TorchScript exporter needs no onnxscript and handles timm and transformers models
    )


def onnx_features(model: torch.nn.Module, size: int, tolerance: float = DEFAULT_TOLERANCE) -> OnnxForward | None:
    """The pooled-feature extractor of a timm-backed model on ONNX Runtime, exported in memory
    (about a second), or None when it disagrees with PyTorch by more than ``tolerance``."""
    from .models import PooledFeatures

    features = PooledFeatures(model).eval()
    buffer = io.BytesIO()
    _export(features, buffer, size, "features")
    runner = OnnxForward(buffer.getvalue())
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = float((runner(probe) - features(probe)).abs().max())
    if difference > tolerance:
        logger.warning("ONNX features differ from PyTorch by %.1e: keeping PyTorch for them", difference)
        return None
    return runner


def load_onnx(checkpoint: str | os.PathLike) -> OnnxForward:
    """The checkpoint's ``model.onnx``, refused when missing or exported from other weights."""
    checkpoint = Path(checkpoint)
    path = checkpoint / ONNX_FILE
    fix = f"run `python -m bonebreak.export --onnx --model_path {checkpoint}`"
    if not path.is_file():
        raise OnnxUnavailable(f"{path} not found: {fix}")
    try:
        runner = OnnxForward(path)
    except OnnxUnavailable:
        raise
    except Exception as error:  # ORT raises its own types for truncated or foreign files
        raise OnnxUnavailable(f"{path} cannot be loaded ({error}): {fix}") from error
    if runner.metadata.get(WEIGHTS_HASH_KEY) != weights_sha256(checkpoint):
        raise OnnxUnavailable(f"{path} was exported from different weights than {checkpoint / WEIGHTS_FILE}: {fix}")
    return runner


def max_probability_difference(model: torch.nn.Module, runner: OnnxForward, pixels: torch.Tensor) -> float:
    with torch.inference_mode():
        reference = torch.softmax(model(pixel_values=pixels).logits.float(), dim=-1)
    return float((torch.softmax(runner(pixels), dim=-1) - reference).abs().max())


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict:
    """Export, stamp the weights hash, and verify against PyTorch at batch 1 and 4.

    Raises ``ValueError`` (and writes nothing) when any probability differs by more than ``tolerance``.
    """
    import onnx

    from .transforms import preprocess_config_from_processor

    checkpoint = Path(checkpoint)
    output = Path(output) if output else checkpoint / ONNX_FILE
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")  # a crash never leaves a half-written model.onnx
    model, processor = load_checkpoint(checkpoint)
    size = preprocess_config_from_processor(processor).image_size
    try:
        _export(_LogitsOnly(model), partial, size, "logits", opset)
        graph = onnx.load(str(partial))
        onnx.helper.set_model_props(graph, {WEIGHTS_HASH_KEY: weights_sha256(checkpoint), "source": checkpoint.name})
        onnx.save(graph, str(partial))
        runner = OnnxForward(partial)
        generator = torch.Generator().manual_seed(seed)
        differences = {f"batch_{n}": max_probability_difference(model, runner, torch.randn(n, 3, size, size, generator=generator)) for n in (1, 4)}
        worst = max(differences.values())
        if worst > tolerance:
            raise ValueError(f"ONNX export disagrees with PyTorch: max probability difference {worst:.2e} > --tolerance {tolerance:g}")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (opset %d, dynamic batch); max probability difference to PyTorch %.1e", output, opset, worst)
    return {"path": str(output), "opset": opset, "image_size": size, "max_probability_difference": differences}


@dataclass
class ExportArguments:
    onnx: bool = field(default=False, metadata={"help": "Export to ONNX (the only format so far)."})
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to export."})
    output: str | None = field(default=None, metadata={"help": f"Where to write (default: MODEL_PATH/{ONNX_FILE}, which the app and CLI pick up)."})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset version."})
    tolerance: float = field(default=DEFAULT_TOLERANCE, metadata={"help": "Fail when a probability differs from PyTorch by more than this."})

    def __post_init__(self) -> None:
        if not self.onnx:
            raise ValueError("choose an export format: --onnx")
        if not 7 <= self.opset <= 23:
            raise ValueError(f"--opset must be between 7 and 23, got {self.opset}")
        if self.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(ExportArguments, argv)
    return export_onnx(args.model_path, args.output, args.opset, args.tolerance)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ModelLoadError) as error:
        sys.exit(f"error: {error}")
