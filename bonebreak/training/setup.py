"""What the machine decides before a run, done once when training starts and never while parsing arguments:
the device and precision (``--precision auto``), the process group of a distributed run, and the run folder."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .arguments import BoneBreakTrainingArguments

FP16_NEEDS_CUDA = "--precision fp16 needs a CUDA GPU; on a CPU use --precision bf16 or fp32"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast then runs about 3x faster than fp32 (measured on a 2-core
    Xeon by `benchmarks/speed.py`); without them bf16 is emulated and slower, so auto keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, cuda: bool) -> str:
    """--precision as run here: "fp32", "bf16" or "fp16" (auto: bf16 where native, fp16 on older GPUs, else fp32)."""
    if choice == "fp16" and not cuda:
        raise ValueError(FP16_NEEDS_CUDA)
    if choice != "auto":
        return choice
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_of(args: BoneBreakTrainingArguments) -> str:
    """The precision a set-up run trains in, under the one name records and cards use."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def machine_defaults() -> dict[str, bool]:
    """Settings that must be known before ``TrainingArguments`` exists: Transformers sets up the device (and Accelerate
    the process group) while constructing it, so a CPU-only machine has to say use_cpu first, or each process of a
    multi-process CPU launch would train on its own."""
    return {"use_cpu": not torch.cuda.is_available()}


def for_this_machine(args: BoneBreakTrainingArguments) -> BoneBreakTrainingArguments:
    """--precision resolved to Transformers' --bf16/--fp16, and --use_cpu set where there is no GPU to use.

    Without a GPU, use_cpu makes Accelerate form a gloo process group when launched with several processes;
    otherwise each process would silently train on its own.
    """
    cuda = torch.cuda.is_available() and not args.use_cpu
    explicit = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if explicit == "fp16" and not cuda:
        raise ValueError(FP16_NEEDS_CUDA)
    chosen = explicit or resolve_precision(args.precision, cuda)
    return replace(args, use_cpu=args.use_cpu or not cuda, bf16=chosen == "bf16", fp16=chosen == "fp16")


def new_run_dir(model: str) -> str:
    """runs/<model>-<date>-<time>; every process of a distributed run gets rank 0's name."""
    name = Path(model.rstrip("/")).name or "model"  # a Hub id "google/vit-base-patch16-224" -> "vit-base-patch16-224"
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState()  # joins the process group that Trainer would set up anyway
        broadcast_object_list(stamp)  # the clocks of two processes can straddle a second
    return str(Path("runs") / f"{name}-{stamp[0]}")


def with_output_dir(args: BoneBreakTrainingArguments, model: str) -> BoneBreakTrainingArguments:
    """Fill in a fresh run folder when none was given; refuse to replace a non-empty one by accident."""
    if not args.output_dir:
        return replace(args, output_dir=new_run_dir(model))
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume):
        raise ValueError(
            f"--output_dir {out} is not empty: leave --output_dir out to train into a new runs/ folder, pick another "
            "folder, or pass --overwrite_output_dir to replace it (--resume continues an interrupted run)"
        )
    return args


def set_up_run(args: BoneBreakTrainingArguments, model: str) -> BoneBreakTrainingArguments:
    """The arguments a run trains with: machine-resolved, with a run folder, and a Hub repo named after it."""
    args = with_output_dir(for_this_machine(args), model)
    if args.push_to_hub and not args.hub_model_id:
        args = replace(args, hub_model_id=Path(args.output_dir).name)  # not the name of the .trainer folder
    return args
