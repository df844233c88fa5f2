"""The ONNX Runtime backend: export a checkpoint to ``model.onnx``, load it, run it.

The exported graph maps ``pixel_values`` (batch, 3, H, W; batch is dynamic) to ``logits`` and,
for a head that is a linear layer on globally average-pooled features (the timm-backed
EfficientNet-Lite), also to ``features``, the last feature map: the class-activation heat map
is then computed from that same forward pass (``linear_cam_head``). Decoding and preprocessing
stay in Python (``bonebreak.transforms``), so the ONNX model is fed exactly what the PyTorch one
is. The file records the SHA-256 of the weights it came from: a checkpoint retrained after
export is detected and not served stale.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import torch

from .models import WEIGHTS_FILE, PooledFeatures, classifier_head, load_checkpoint
from .transforms import preprocess_config_from_processor

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
WEIGHTS_HASH_KEY = "bonebreak_weights_sha256"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4  # largest allowed softmax probability difference to PyTorch
EXPORT_COMMAND = "python -m bonebreak.export --model_path {}"


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


def linear_cam_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The classifier's linear head when logits = head(global average of the last feature map).

    For such a head Grad-CAM equals CAM, relu(sum_c w[class, c] * features[c]), so the heat map
    needs no backward pass. Only timm-backed models with a (B, C, H, W) feature map qualify, and
    only when ``forward_head`` is checked to be exactly pooling + that layer (a head with layers
    after the pooling, such as MobileNetV3's, is refused). None otherwise (ViT tokens, ...).
    """
    timm_model = getattr(model, "timm_model", None)
    head = classifier_head(model)
    if timm_model is None or head is None or getattr(timm_model, "num_features", None) != head.in_features:
        return None
    probe = torch.randn(2, head.in_features, 3, 3, generator=torch.Generator().manual_seed(0))
    probe = probe.to(head.weight.device, head.weight.dtype)
    was_training = timm_model.training
    timm_model.eval()
    try:
        with torch.inference_mode():
            expected = torch.nn.functional.linear(probe.mean(dim=(2, 3)), head.weight, head.bias)
            same = torch.allclose(timm_model.forward_head(probe), expected, rtol=1e-4, atol=1e-5)
    except Exception:  # a head that cannot take a small (B, C, H, W) map is not a pooled linear one
        same = False
    finally:
        timm_model.train(was_training)
    return head if same else None


class LogitsAndFeatures(torch.nn.Module):
    """A timm-backed classifier as pixels -> (logits, last feature map), one forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.timm_model = model.timm_model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.timm_model.forward_features(pixel_values)
        return self.timm_model.forward_head(features), features


class _LogitsOnly(torch.nn.Module):
    """The classifier as pixels -> logits tensor (ONNX graphs return tensors, not ModelOutputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class OnnxForward:
    """An ONNX Runtime CPU session over a pixel batch, like the PyTorch model.

    Calling it returns the first output (the logits); ``outputs`` returns every output by name.
    ``source`` is a file or, for graphs exported on the fly, the serialised model bytes.
    """

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort  # lazy: a heavy package that only this backend needs
        except ImportError as error:
            raise OnnxUnavailable("onnxruntime is not installed: pip install -r requirements.txt") from error
        options = ort.SessionOptions()
        # Idle ORT threads otherwise spin for a while after each run and starve the PyTorch work
        # that follows: measured 15 ms instead of 1.3 ms for a conv right after a run, against
        # 3.8 instead of 3.1 ms per ORT run without spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_names = [output.name for output in self.session.get_outputs()]

    def outputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        results = self.session.run(None, {"pixel_values": pixels.detach().cpu().float().numpy()})
        return {name: torch.from_numpy(result) for name, result in zip(self.output_names, results)}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (output, *_) = self.session.run(None, {"pixel_values": pixels.detach().cpu().float().numpy()})
        return torch.from_numpy(output)


def _export(module: torch.nn.Module, target: str | os.PathLike | io.BytesIO, size: int, outputs: list[str],
            opset: int = DEFAULT_OPSET) -> None:
    torch.onnx.export(
        module.eval(), (torch.zeros(1, 3, size, size),), target if isinstance(target, io.BytesIO) else str(target),
        input_names=["pixel_values"], output_names=outputs,
        dynamic_axes={"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        opset_version=opset,
        dynamo=False,  # the TorchScript exporter needs no onnxscript and handles timm and transformers models
    )


def onnx_features(model: torch.nn.Module, size: int, tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None) -> OnnxForward | None:
    """The pooled-feature extractor of a timm-backed model on ONNX Runtime, exported in memory
    (about a second), or None when it disagrees with PyTorch by more than ``tolerance``.
    ``threads``: ONNX Runtime's intra-op threads (default: one per core)."""
    features = PooledFeatures(model).eval()
    buffer = io.BytesIO()
    _export(features, buffer, size, ["features"])
    runner = OnnxForward(buffer.getvalue(), threads)
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
    fix = f"run `{EXPORT_COMMAND.format(checkpoint)}`"
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


def select_onnx(checkpoint: str | os.PathLike, backend: str, on_cpu: bool) -> OnnxForward | None:
    """The ONNX Runtime forward for ``backend`` ("torch": None; "onnx": required; "auto": when usable,
    else None with the reason logged)."""
    if backend == "torch":
        return None
    if not on_cpu:
        if backend == "onnx":
            raise ValueError("--backend onnx runs on CPU only; use --backend torch (or auto) on a GPU")
        return None
    try:
        return load_onnx(checkpoint)
    except OnnxUnavailable as error:
        if backend == "onnx":
            raise ValueError(str(error)) from error
        logger.info("using PyTorch, not ONNX Runtime: %s", error)
        return None


def max_probability_difference(model: torch.nn.Module, runner: OnnxForward, pixels: torch.Tensor) -> float:
    with torch.inference_mode():
        reference = torch.softmax(model(pixel_values=pixels).logits.float(), dim=-1)
    return float((torch.softmax(runner(pixels), dim=-1) - reference).abs().max())


def max_feature_difference(model: torch.nn.Module, runner: OnnxForward, pixels: torch.Tensor) -> float:
    """Largest difference of the exported feature map to PyTorch's, relative to its largest value."""
    with torch.inference_mode():
        _, reference = LogitsAndFeatures(model).eval()(pixels)
    return float((runner.outputs(pixels)["features"] - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict:
    """Export, stamp the weights hash, and verify against PyTorch at batch 1 and 4.

    Raises ``ValueError`` (and writes nothing) when any probability, or the feature map that the
    heat map is computed from (relative to its largest value), differs by more than ``tolerance``.
    """
    import onnx  # lazy: a heavy package that only exporting needs

    checkpoint = Path(checkpoint)
    output = Path(output) if output else checkpoint / ONNX_FILE
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")  # a crash never leaves a half-written model.onnx
    model, processor = load_checkpoint(checkpoint)
    size = preprocess_config_from_processor(processor).image_size
    with_features = linear_cam_head(model) is not None
    try:
        module = LogitsAndFeatures(model) if with_features else _LogitsOnly(model)
        _export(module, partial, size, ["logits", "features"] if with_features else ["logits"], opset)
        graph = onnx.load(str(partial))
        onnx.helper.set_model_props(graph, {WEIGHTS_HASH_KEY: weights_sha256(checkpoint), "source": checkpoint.name})
        onnx.save(graph, str(partial))
        runner = OnnxForward(partial)
        generator = torch.Generator().manual_seed(seed)
        probes = {n: torch.randn(n, 3, size, size, generator=generator) for n in (1, 4)}
        differences = {f"batch_{n}": max_probability_difference(model, runner, x) for n, x in probes.items()}
        features = {f"batch_{n}": max_feature_difference(model, runner, x) for n, x in probes.items()} if with_features else {}
        worst = max(differences.values())
        if worst > tolerance:
            raise ValueError(f"ONNX export disagrees with PyTorch: max probability difference {worst:.2e} > --tolerance {tolerance:g}")
        if features and max(features.values()) > tolerance:
            raise ValueError(f"ONNX export disagrees with PyTorch: relative feature-map difference {max(features.values()):.2e} "
                             f"> --tolerance {tolerance:g}")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (opset %d, dynamic batch, outputs %s); max probability difference to PyTorch %.1e",
                output, opset, runner.output_names, worst)
    return {"path": str(output), "opset": opset, "image_size": size, "outputs": runner.output_names,
            "max_probability_difference": differences, "max_relative_feature_difference": features}
