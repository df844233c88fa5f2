"""Speed of BoneBreak's own paths against bare baselines, measured side by side in one run.

    python -m benchmarks.speed [--data_dir DIR] [--model_path checkpoints/bone_break_model] [--only_app]

Prints, and writes to benchmarks/results/speed/<time>.json:
- training: img/s of our Trainer path vs a bare PyTorch loop on the same model, batch, data
  pipeline and precision (target ratio >= 0.9); images decoded once vs on every read; and
  the Trainer with 0/1/2 dataloader workers;
- inference: latency p50/p95 of ``Predictor.predict`` (decode + preprocess + forward +
  softmax) vs a bare forward on a preloaded tensor (target <= 1.2x), on PyTorch eager and
  ONNX Runtime; ONNX Runtime vs PyTorch eager at batch 1 (target >= 2x);
- the predict CLI's folder throughput (img/s, X-ray check included);
- the app: p50 of one request as the app serves it (decode + prediction + heat map + X-ray
  check + the output picture) vs a bare ONNX forward of the classifier (target <= 2.5x), and
  the first request of a freshly started app vs the median request (target <= 2x).
Ratios are what to compare across machines; absolute numbers depend on the CPU and load. For an ensemble
checkpoint (``bonebreak add-member``) every "bare forward" is the forward passes of all its members.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from transformers import TrainerCallback

from benchmarks.records import write_report
from benchmarks.timing import percentiles_ms, time_calls
from bonebreak.models.serving_backend import load_served
from bonebreak.common.checkpoint_format import ONNX_FILE, SHIPPED_MODEL
from bonebreak.data.layouts import resolve_data_dir
from bonebreak.data.loading import image_paths, load_splits
from bonebreak.models.factory import create_model, preprocess_config_of
from bonebreak.models.onnx_export import export_onnx
from bonebreak.models.torch_backend import load_classifier
from bonebreak.serving.batch_predict import predict_files
from bonebreak.serving.loader import Classifier
from bonebreak.serving.predictor import Predictor
from bonebreak.serving.ui import OutputImages, RequestHandler, serving_threads
from bonebreak.training.arguments import BoneBreakTrainingArguments, DataArguments, ModelArguments
from bonebreak.training.augment import AugmentConfig, collate, train_transform
from bonebreak.training.options import class_weights, make_loss
from bonebreak.training.setup import for_this_machine, precision_of
from bonebreak.training.trainer import build_trainer, model_inputs, prepare_data


# --- training ----------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Times Trainer steps after a warm-up and stops training after ``steps`` timed steps."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.marks = warmup, steps, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup:
            self.marks.append(time.perf_counter())
        if len(self.marks) > self.steps:
            control.should_training_stop = True


Setup = tuple[ModelArguments, DataArguments, BoneBreakTrainingArguments]


def trainer_images_per_second(setup: Setup, data: Any, warmup: int, steps: int) -> float:
    model_args, data_args, args = setup
    torch.manual_seed(args.seed)
    model, processor = create_model(model_args.model, data.labels, model_args.image_size)
    trainer = build_trainer(model_args, data_args, args, data, model, processor)
    timer = StepTimer(warmup, steps)
    trainer.add_callback(timer)
    trainer.train()
    return steps * args.per_device_train_batch_size / (timer.marks[-1] - timer.marks[0])


def bare_images_per_second(setup: Setup, data: Any, warmup: int, steps: int) -> float:
    """The same model, data pipeline, loss, optimizer and precision in a plain PyTorch loop."""
    model_args, data_args, args = setup
    torch.manual_seed(args.seed)
    model, processor = create_model(model_args.model, data.labels, model_args.image_size)
    transform = train_transform(preprocess_config_of(model, processor), AugmentConfig(policy=args.augment))
    workers = args.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        model_inputs(data.splits["train"], transform, data_args.cache_images), batch_size=args.per_device_train_batch_size,
        shuffle=True, drop_last=True, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
    )
    weights = class_weights(list(data.splits["train"]["label"]), len(data.labels)) if args.class_weighted_loss else None
    loss_fn = make_loss(weights, args.label_smoothing_factor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    bf16 = precision_of(args) == "bf16"  # the precision the Trainer path trains in (args are set up for_this_machine)
    model.train()
    marks, done = [], 0
    while len(marks) <= steps:
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(pixel_values=batch["pixel_values"]), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done >= warmup:
                marks.append(time.perf_counter())
            if len(marks) > steps:
                break
    return steps * args.per_device_train_batch_size / (marks[-1] - marks[0])


def training_section(data_dir: str, warmup: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        model_args, data_args = ModelArguments(), DataArguments(data_dir=data_dir)
        # as a run sets them up: --precision auto resolved to --bf16/--fp16, --use_cpu where there is no GPU
        args = for_this_machine(BoneBreakTrainingArguments(output_dir=str(Path(scratch) / "model"), num_train_epochs=100,
                                                           early_stopping_patience=0, logging_steps=1000, overwrite_output_dir=True))
        setup = (model_args, data_args, args)
        data = prepare_data(data_args, args.seed)
        runs: dict[str, float] = {}
        # Interleaved and repeated so a change in machine load hits both paths alike.
        for repeat in (1, 2):
            runs[f"bare_loop_{repeat}"] = bare_images_per_second(setup, data, warmup, steps)
            runs[f"trainer_{repeat}"] = trainer_images_per_second(setup, data, warmup, steps)
        runs["bare_loop_streamed"] = bare_images_per_second((model_args, replace(data_args, cache_images=False), args), data, warmup, steps)
        for workers in (0, 1):
            runs[f"trainer_workers_{workers}"] = trainer_images_per_second(
                (model_args, data_args, replace(args, dataloader_num_workers=workers)), data, warmup, steps)
    bare = (runs["bare_loop_1"] + runs["bare_loop_2"]) / 2
    ours = (runs["trainer_1"] + runs["trainer_2"]) / 2
    return {
        "setup": {"model": model_args.model, "batch_size": args.per_device_train_batch_size,
                  "precision": precision_of(args),
                  "num_workers": args.dataloader_num_workers, "timed_steps": steps, "warmup_steps": warmup, "augment": args.augment},
        "images_per_second": {k: round(v, 2) for k, v in runs.items()},
        "trainer_vs_bare_loop": round(ours / bare, 3),
        "decoded_cache_vs_streamed": round(bare / runs["bare_loop_streamed"], 3),
    }


# --- inference ---------------------------------------------------------------------------


def members(classifier: Classifier) -> list[Predictor]:
    """The models a checkpoint serves: its own, plus an ensemble checkpoint's members."""
    return list(getattr(classifier, "members", [classifier]))


def preloaded(classifier: Classifier, files: list[str]) -> list[list[np.ndarray]]:
    """Each image preprocessed in advance for every model served (each has its own preprocessing and size)."""
    return [[member.pixels([member.load(f)]) for member in members(classifier)] for f in files]


def bare_forward(classifier: Classifier):
    """The bare baseline: the forward pass of every model the classifier serves (one, or an ensemble's
    members), on inputs preprocessed in advance, on the classifier's backend (each member's ``Predictor.forward``)."""
    served = members(classifier)

    def forward(inputs: list[np.ndarray]) -> None:
        for member, x in zip(served, inputs):
            member.forward(x)
    return forward


def without_xray_check(classifier: Classifier) -> Classifier:
    """The same classifier with its X-ray check switched off, so ``predict`` times the classification alone."""
    for member in members(classifier):
        member.xray_check = None
    if hasattr(classifier, "members"):
        classifier.xray_check = None
    return classifier


def inference_section(model_path: str, files: list[str], rounds: int = 5) -> dict:
    if not (Path(model_path) / ONNX_FILE).is_file():
        export_onnx(model_path)
    # predict() itself; the X-ray check is timed on its own below (with_xray)
    eager = without_xray_check(load_classifier(model_path, backend="torch", device="cpu"))
    onnx = without_xray_check(load_classifier(model_path, backend="onnx", device="cpu"))
    with_xray = load_classifier(model_path, backend="onnx", device="cpu")
    pixels = preloaded(eager, files)
    bare_torch, bare_onnx = bare_forward(eager), bare_forward(onnx)

    timings: dict[str, list[float]] = {}
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):  # interleaved rounds, so a change in machine load hits every path alike
        medians = {}
        for name, fn, inputs in [("bare_forward_torch", bare_torch, pixels), ("bare_forward_onnx", bare_onnx, pixels),
                                 ("predict_torch", eager.predict, files), ("predict_onnx", onnx.predict, files),
                                 ("predict_onnx_with_xray_check", with_xray.predict, files)]:
            seconds = time_calls(fn, inputs)
            timings.setdefault(name, []).extend(seconds)
            medians[name] = float(np.median(seconds))
        per_round.append(medians)

    def ratio(numerator: str, denominator: str) -> dict[str, float]:
        """Median over rounds of the per-round ratio of medians, with the range seen."""
        values = [r[numerator] / r[denominator] for r in per_round]
        return {"median": round(float(np.median(values)), 2), "min": round(min(values), 2), "max": round(max(values), 2)}
    return {
        "images": len(files),
        "models": len(members(eager)),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "latency": {name: percentiles_ms(s) for name, s in timings.items()},
        "onnx_vs_torch_forward_speedup": ratio("bare_forward_torch", "bare_forward_onnx"),
        "predict_vs_bare_forward": {
            "torch": ratio("predict_torch", "bare_forward_torch"),
            "onnx": ratio("predict_onnx", "bare_forward_onnx"),
            "onnx_predict_vs_bare_torch_forward": ratio("predict_onnx", "bare_forward_torch"),
        },
    }


def folder_section(model_path: str, files: list[str]) -> dict:
    result = {}
    for backend in ("torch", "onnx"):
        predictor = load_classifier(model_path, backend=backend, device="cpu")
        predict_files(predictor, [Path(f) for f in files[:16]])  # warm-up (and loads the X-ray check's model)
        started = time.perf_counter()
        predict_files(predictor, [Path(f) for f in files])
        result[f"{backend}_images_per_second"] = round(len(files) / (time.perf_counter() - started), 1)
    return {"images": len(files), "batch_size": 16, **result}


# --- the app -----------------------------------------------------------------------------


def app_section(model_path: str, files: list[str], rounds: int = 3) -> dict:
    """A request as the app serves it (``RequestHandler``: decode, prediction, heat map, X-ray check,
    output picture) against a bare ONNX Runtime forward of the classifier on a preloaded tensor;
    and the first request of a freshly started app (start-up as ``app.py`` does it) vs the median."""
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        predictor = load_served(model_path, "onnx")
        threads = torch.get_num_threads()
        limits = threadpool_limits(limits=None)  # restores BLAS/OpenMP pools on exit
        serving_threads(predictor)  # as app.py sets them
        threads_while_serving = torch.get_num_threads()
        classify = RequestHandler(predictor, outputs=OutputImages(folder=Path(scratch)))
        startup = time.perf_counter() - started
        started = time.perf_counter()
        classify(files[0], True)
        first = time.perf_counter() - started
        pixels = preloaded(predictor, files)
        bare_onnx = bare_forward(predictor)
        timings: dict[str, list[float]] = {}
        per_round = []
        for _ in range(rounds):  # interleaved, so a change in machine load hits both alike
            medians = {}
            for name, fn, inputs in [("bare_forward_onnx", bare_onnx, pixels),
                                     ("app_request", lambda f: classify(f, True), files)]:
                seconds = time_calls(fn, inputs)
                timings.setdefault(name, []).extend(seconds)
                medians[name] = float(np.median(seconds))
            per_round.append(medians)
        torch.set_num_threads(threads)
        limits.restore_original_limits()
    ratios = [r["app_request"] / r["bare_forward_onnx"] for r in per_round]
    median_request = float(np.median(timings["app_request"]))
    return {
        "images": len(files),
        "models": len(members(predictor)),
        "rounds": rounds,
        "startup_s": round(startup, 2),
        "torch_threads_while_serving": threads_while_serving,
        "latency": {name: percentiles_ms(s) for name, s in timings.items()},
        "app_request_vs_bare_onnx_forward": {"median": round(float(np.median(ratios)), 2), "min": round(min(ratios), 2),
                                             "max": round(max(ratios), 2), "target": 2.5},
        "first_request_ms": round(first * 1e3, 1),
        "first_request_vs_median_request": {"ratio": round(first / median_request, 2), "target": 2.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="Dataset folder (default: $BONEBREAK_DATA, else data/bone-break).")
    parser.add_argument("--model_path", default=SHIPPED_MODEL, help="Checkpoint for the inference benchmarks.")
    parser.add_argument("--train_steps", type=int, default=12, help="Timed training steps per run (after warm-up).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps first (worker start-up, allocator).")
    parser.add_argument("--skip_training", action="store_true", help="Only the inference benchmarks.")
    parser.add_argument("--only_app", action="store_true", help="Only the app-request measurements (about a minute).")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/speed/<time>.json).")
    args = parser.parse_args()
    if args.train_steps < 2 or args.warmup_steps < 1:
        parser.error("--train_steps must be >= 2 and --warmup_steps >= 1")

    data_dir = str(resolve_data_dir(args.data_dir))
    data = load_splits(data_dir)
    files = image_paths(data.splits["clean_test" if "clean_test" in data.splits else "validation"])
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        # First, so that its "first request" is the first one this process serves.
        "app": app_section(args.model_path, files[:30]),
    }
    if not args.only_app:
        report["inference"] = inference_section(args.model_path, files[:60])
        report["cli_folder"] = folder_section(args.model_path, files)
    if not args.skip_training and not args.only_app:
        report["training"] = training_section(data_dir, args.warmup_steps, args.train_steps)
    write_report(report, args.out, "benchmarks/results/speed", "")


if __name__ == "__main__":
    main()
