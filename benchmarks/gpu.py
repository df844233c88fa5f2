"""GPU measurements that the 2-core CPU benchmarks (``benchmarks/speed.py``) cannot make.

    python -m benchmarks.gpu init --arch vit_base --out runs/vit-base-init
    python -m benchmarks.gpu inference --model_path runs/lite0-gpu [--data_dir DIR] [--device cuda]

``init`` writes a randomly initialised, real-size model folder (``--arch vit_base``: ``ViTConfig()``, patch
16, 224 px, 86M parameters; ``convnext_tiny``: ``ConvNextConfig()``, 28M) that ``bonebreak train --model DIR``
fine-tunes like any Hub checkpoint. No such weights can be downloaded here, so this is how the ViT and
ConvNeXt training paths are exercised at full size on a GPU (throughput, memory, loss going down).

``inference`` times a checkpoint's ``Predictor`` (PyTorch on ``--device``) side by side, in one run:
- batch 1: p50/p95 of ``predict`` (decode + preprocess + forward + softmax, X-ray check off) and of a
  bare forward of the network on a tensor preloaded on the device;
- batch 64: images per second of ``predictions`` over 64 files and of a bare forward of 64 images;
- the same checkpoint's ONNX Runtime CPU backend on this machine's CPU, batch 1, for comparison.
It writes ``benchmarks/results/gpu/<time>-inference.json`` (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from benchmarks.records import write_report
from benchmarks.timing import percentiles_ms, time_calls
from bonebreak.common.checkpoint_format import ONNX_FILE
from bonebreak.data.layouts import resolve_data_dir
from bonebreak.data.loading import image_paths, load_splits
from bonebreak.models.onnx_export import export_onnx
from bonebreak.models.torch_backend import TorchForward
from bonebreak.serving.loader import load_predictor


def _vit_base() -> tuple[Any, Any]:
    return ViTForImageClassification(ViTConfig(image_size=224, patch_size=16)), ViTImageProcessor(size={"height": 224, "width": 224})


def _convnext_tiny() -> tuple[Any, Any]:
    return ConvNextForImageClassification(ConvNextConfig()), ConvNextImageProcessor(size={"shortest_edge": 224})


ARCHITECTURES: dict[str, Callable[[], tuple[Any, Any]]] = {"vit_base": _vit_base, "convnext_tiny": _convnext_tiny}


def write_random_init(arch: str, out: str | os.PathLike) -> Path:
    """A real-size, randomly initialised model folder (config, weights, image processor)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {', '.join(sorted(ARCHITECTURES))}, got {arch!r}")
    torch.manual_seed(0)
    model, processor = ARCHITECTURES[arch]()
    folder = Path(out)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def inference_report(model_path: str, files: list[str], device: str, batch: int = 64) -> dict[str, Any]:
    if len(files) < batch:
        raise ValueError(f"need at least {batch} images for the batch-{batch} measurement, found {len(files)}")
    predictor = load_predictor(model_path, "torch", lambda path: TorchForward.from_checkpoint(path, device=device), xray_check=False)
    network: TorchForward = predictor.forward
    where = network.device
    one = torch.from_numpy(predictor.pixels([predictor.load(files[0])])).to(where)
    many = torch.from_numpy(predictor.pixels([predictor.load(f) for f in files[:batch]])).to(where)
    sync = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)

    def bare(pixels: torch.Tensor) -> torch.Tensor:
        """The network alone on a tensor already on the device: no decoding, preprocessing, copies or softmax."""
        return network.model(pixel_values=pixels).logits

    with torch.inference_mode():
        single = time_calls(predictor.predict, files, sync=sync)
        bare_single = time_calls(lambda _: bare(one), range(100), sync=sync)
        end_to_end = time_calls(lambda _: predictor.predictions(files[:batch], batch_size=batch), range(5), warmup=1, sync=sync)
        bare_many = time_calls(lambda _: bare(many), range(20), sync=sync)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
        "backend": predictor.description,
        "batch_1": {"predict": percentiles_ms(single), "bare_forward": percentiles_ms(bare_single)},
        f"batch_{batch}": {
            "predictions_images_per_second": round(batch / float(np.median(end_to_end)), 1),
            "bare_forward_images_per_second": round(batch / float(np.median(bare_many)), 1),
        },
    }
    if not (Path(model_path) / ONNX_FILE).exists():
        export_onnx(Path(model_path))
    onnx = load_predictor(model_path, "onnx", xray_check=False)
    report["cpu_onnx_batch_1"] = {"threads": torch.get_num_threads(),
                                  "predict": percentiles_ms(time_calls(onnx.predict, files))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="Write a randomly initialised real-size model folder.")
    init.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    init.add_argument("--out", required=True, help="Folder to write (then: bonebreak train --model FOLDER).")
    infer = commands.add_parser("inference", help="Predictor latency and throughput on --device.")
    infer.add_argument("--model_path", required=True, help="A trained checkpoint folder.")
    infer.add_argument("--data_dir", default=None, help="Dataset folder (default: $BONEBREAK_DATA, else data/bone-break).")
    infer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu.")
    infer.add_argument("--batch", type=int, default=64, help="Batch size of the throughput measurement.")
    infer.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu/<time>-inference.json).")
    args = parser.parse_args()
    if args.command == "init":
        print(f"wrote {write_random_init(args.arch, args.out)}")
        return
    data = load_splits(str(resolve_data_dir(args.data_dir)))
    files = image_paths(data.splits["clean_test" if "clean_test" in data.splits else "test"])
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
              "model_path": args.model_path, "images": len(files), **inference_report(args.model_path, files, args.device, args.batch)}
    write_report(report, args.out, "benchmarks/results/gpu", "-inference")


if __name__ == "__main__":
    main()
