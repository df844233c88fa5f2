"""Fine-tune a fracture classifier with the Hugging Face ``Trainer``.

``python train.py`` and ``accelerate launch train.py`` (one or many GPUs, several nodes, or
two CPU processes over gloo) run the same code: Accelerate decides the device and the
process group; mixed precision is switched on when a CUDA GPU is present.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torchvision.transforms import v2
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import set_seed

from .data import DecodedImages, LoadedData, load_splits, resolve_data_dir, split_counts_of
from . import model_card
from .calibration import OOD_FILE, OODDetector, calibrate_predictor, fold_temperature
from .cli import parse
from .evaluate import comparison_table, image_paths, ood_check, run_evaluation
from .export import export_onnx
from .inference import Ensemble, Predictor
from .metrics import classification_metrics, headline
from .models import create_model, save_checkpoint
from .plots import plot_training_curves
from .transforms import (
    AUGMENT_POLICIES,
    EQUALIZE_KEY,
    AugmentConfig,
    batch_transform,
    collate,
    eval_transform,
    preprocess_config_from_processor,
    train_transform,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Dataset folder in Roboflow, Kaggle or plain <class>/ layout (default: $BONEBREAK_DATA, else data/bone-break)."},
    )
    model: str = field(
        default="efficientnet_lite0",
        metadata={"help": "efficientnet_lite0/1/2 (offline ImageNet weights), or any Hub id or local folder of an image-classification model."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the final model goes (default: a new folder runs/<model>-<date>-<time>, so no run replaces "
                  "another or the shipped model); resumable Trainer checkpoints go to <output_dir>.trainer/. An existing "
                  "non-empty folder is refused unless --overwrite_output_dir or --resume."},
    )
    epochs: float = field(
        default=12,
        metadata={"help": "Maximum number of epochs (early stopping may end sooner). The default, with patience 4, is the "
                  "shipped recipe; 30 epochs measured no better (docs/experiments.md)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per step per process (GPU or CPU process)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate (cosine schedule with warmup)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps spent warming up the learning rate."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy loss."})
    class_weighted_loss: bool = field(
        default=True, metadata={"help": "Weight the loss by inverse class frequency (the classes are imbalanced up to 2:1)."}
    )
    augment: str = field(
        default="basic",
        metadata={"help": f"Augmentation policy: {', '.join(AUGMENT_POLICIES)} (basic: crop, flip, rotation, brightness/contrast; "
                  "the others add TrivialAugment or RandAugment on top)."},
    )
    mixup: float = field(
        default=0.0, metadata={"help": "Probability of mixing a training batch with MixUp or CutMix (half each); 0 disables."}
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise learning-rate decay for timm-backed models: each earlier stage learns this factor "
                  "slower (e.g. 0.7); 1 disables."},
    )
    balanced_sampling: bool = field(
        default=False,
        metadata={"help": "Draw training images with probability inverse to their class frequency "
                  "(instead of, or with, the weighted loss)."},
    )
    ema: float = field(
        default=0.0,
        metadata={"help": "Evaluate and keep an exponential moving average of the weights with this decay (e.g. 0.99); 0 disables. "
                  "Needs epoch-end evaluation (no --save_every_steps); a resumed run restarts the average."},
    )
    distill_from: list[str] = field(
        default_factory=list,
        metadata={"help": "Teacher checkpoint folders: train on (1 - w) x the true label + w x their mean probabilities "
                  "(knowledge distillation). Teachers must not have trained on this run's validation or test images."},
    )
    distill_weight: float = field(default=0.5, metadata={"help": "w above: the teachers' share of each training target."})
    equalize: bool = field(
        default=False,
        metadata={"help": "Histogram-equalise every radiograph before resizing, in training and (saved in the checkpoint) at inference."},
    )
    dedup_groups: bool = field(
        default=False, metadata={"help": "Train on one image per near-duplicate group of the split manifest."}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on GPUs and on CPUs with native bf16, i.e. AVX512-BF16 or AMX; otherwise fp16 on GPUs and "
                  "fp32 on CPUs), fp32, bf16 or fp16 (GPU only)."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Square input side in pixels (default: the model's own)."})
    val_fraction: float = field(
        default=0.15, metadata={"help": "Fraction of train held out (stratified, seeded) when no split manifest applies."}
    )
    split_manifest: str = field(
        default="auto",
        metadata={"help": "Leak-free grouped splits from `python -m bonebreak.audit`: a CSV path, 'auto' (splits/bone_break_manifest.csv "
                  "when it lists exactly the files of --data_dir) or 'none' (stratified random validation split)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for the split, initialisation, augmentation and data order."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in <output_dir>.trainer/."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"aliases": ["--overwrite"],
                  "help": "Replace a non-empty --output_dir and start over even if <output_dir>.trainer/ holds checkpoints of an earlier run."},
    )
    early_stopping_patience: int = field(
        default=4, metadata={"help": "Stop after this many epochs without a better validation macro-F1 (0: never)."}
    )
    save_every_steps: int = field(
        default=0,
        metadata={"help": "Evaluate and save a resumable checkpoint every N steps (0: at the end of every epoch)."},
    )
    num_workers: int = field(default=2, metadata={"help": "Data-loading worker processes per training process."})
    cache_images: bool = field(
        default=True,
        metadata={"help": "Decode every image once into memory (about 0.5 GB for this dataset) instead of once per epoch; "
                  "--cache_images False streams them from disk (datasets too large for memory)."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N shuffled training images (quick experiments, tests)."}
    )
    cv_folds: int = field(
        default=0,
        metadata={"aliases": ["--cv"], "help": "Instead of one model, run grouped stratified k-fold cross-validation over Train and write "
                  "<output_dir>/cv.json (needs the grouped split manifest; e.g. 5)."},
    )
    export_onnx: bool = field(
        default=True,
        metadata={"help": "Also write an ONNX copy (model.onnx, verified against PyTorch) that the app and CLI run on CPU by default."},
    )
    evaluate_test: bool = field(
        default=True, metadata={"help": "After training, evaluate the best model on the test split (never used for selection)."}
    )

    def __post_init__(self) -> None:
        checks = {
            "--epochs": self.epochs > 0,
            "--batch_size": self.batch_size >= 1,
            "--learning_rate": self.learning_rate > 0,
            "--val_fraction": 0 < self.val_fraction < 1,
            "--warmup_ratio": 0 <= self.warmup_ratio < 1,
            "--label_smoothing": 0 <= self.label_smoothing < 1,
            "--num_workers": self.num_workers >= 0,
            "--early_stopping_patience": self.early_stopping_patience >= 0,
            "--save_every_steps": self.save_every_steps >= 0,
            "--cv_folds": self.cv_folds == 0 or self.cv_folds >= 2,
            "--mixup": 0 <= self.mixup <= 1,
            "--layer_decay": 0 < self.layer_decay <= 1,
            "--precision": self.precision in PRECISIONS,
            "--augment": self.augment in AUGMENT_POLICIES,
            "--ema": self.ema == 0 or 0 < self.ema < 1,
            "--distill_weight": 0 <= self.distill_weight <= 1,
        }
        bad = [flag for flag, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid value for {', '.join(bad)}; see `python train.py --help`")
        if self.distill_from and self.mixup:
            raise ValueError("--distill_from and --mixup both make soft targets: use one of them")
        if self.distill_from and not self.cache_images:
            raise ValueError("--distill_from keeps the teachers' targets with the decoded images: drop --cache_images False")
        if self.ema and self.save_every_steps:
            raise ValueError("--ema averages weights between epoch-end evaluations: drop --save_every_steps or --ema")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume and --overwrite_output_dir contradict each other: pick one")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs the --output_dir of the run to continue (the folder printed when it started)")

    @property
    def work_dir(self) -> Path:
        if not self.output_dir:
            raise ValueError("no --output_dir yet: call with_output_dir() first")
        return Path(f"{self.output_dir.rstrip('/')}.trainer")


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    return parse(TrainArguments, argv)


def new_run_dir(model: str) -> str:
    """runs/<model>-<date>-<time>; every process of a distributed run gets rank 0's name."""
    name = Path(model.rstrip("/")).name or "model"  # a Hub id "google/vit-base-patch16-224" -> "vit-base-patch16-224"
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState()  # joins the process group that Trainer would set up anyway
        broadcast_object_list(stamp)  # the clocks of two processes can straddle a second
    return str(Path("runs") / f"{name}-{stamp[0]}")


def with_output_dir(args: TrainArguments) -> TrainArguments:
    """Fill in a fresh run folder when none was given; refuse to replace a non-empty one by accident."""
    if not args.output_dir:
        return replace(args, output_dir=new_run_dir(args.model))
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume):
        raise ValueError(
            f"--output_dir {out} is not empty: leave --output_dir out to train into a new runs/ folder, pick another "
            "folder, or pass --overwrite_output_dir to replace it (--resume continues an interrupted run)"
        )
    return args


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def make_loss(weights: torch.Tensor | None, label_smoothing: float):
    """Cross-entropy on class indices, or on soft targets from MixUp/CutMix."""

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs.logits.float()
        weight = weights.to(logits.device) if weights is not None else None
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)

    return loss


def make_compute_metrics(labels: list[str]):
    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = torch.tensor(eval_prediction.predictions)
        probs = torch.softmax(logits.float(), dim=-1).numpy()
        return headline(classification_metrics(eval_prediction.label_ids, probs, labels))

    return compute_metrics


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast then runs about 3x faster than fp32 (measured on a 2-core
    Xeon by `benchmarks/speed.py`); without them bf16 is emulated and slower, so auto keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, cuda: bool) -> str:
    if choice == "fp16" and not cuda:
        raise ValueError("--precision fp16 needs a CUDA GPU; on a CPU use --precision bf16 or fp32")
    if choice != "auto":
        return choice
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def training_arguments(args: TrainArguments) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    precision = resolve_precision(args.precision, cuda)
    return TrainingArguments(
        output_dir=str(args.work_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type="cosine",
        eval_strategy="steps" if args.save_every_steps else "epoch",
        save_strategy="steps" if args.save_every_steps else "epoch",
        eval_steps=args.save_every_steps or None,
        save_steps=args.save_every_steps or 500,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=args.num_workers,
        dataloader_persistent_workers=args.num_workers > 0,
        # Without a GPU, use_cpu makes Accelerate form a gloo process group when launched
        # with several processes; otherwise each process would silently train on its own.
        use_cpu=not cuda,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        ddp_find_unused_parameters=False,
    )


def one_per_group(dataset: datasets.Dataset, data: LoadedData) -> datasets.Dataset:
    """Keep the first image (in path order) of every near-duplicate group of the manifest."""
    from .data import read_manifest_groups

    if not data.grouped:
        raise ValueError("--dedup_groups needs the grouped split manifest (--split_manifest, see `python -m bonebreak.audit`)")
    group_of = read_manifest_groups(data.manifest, data.root)
    paths = image_paths(dataset)
    first: dict[str, int] = {}
    for i in sorted(range(len(paths)), key=paths.__getitem__):
        first.setdefault(group_of[Path(paths[i])], i)
    return dataset.select(sorted(first.values()))


def prepare_data(args: TrainArguments) -> LoadedData:
    data = load_splits(resolve_data_dir(args.data_dir), val_fraction=args.val_fraction, seed=args.seed, split_manifest=args.split_manifest)
    if args.dedup_groups:
        before = len(data.splits["train"])
        data.splits["train"] = one_per_group(data.splits["train"], data)
        data.counts["train"] = split_counts_of(data.splits["train"], data.labels)
        logger.info("--dedup_groups: %d of %d training images kept (one per near-duplicate group)", len(data.splits["train"]), before)
    if args.max_train_samples:
        data.splits["train"] = data.splits["train"].shuffle(seed=args.seed).select(
            range(min(args.max_train_samples, len(data.splits["train"])))
        )
        data.counts["train"] = split_counts_of(data.splits["train"], data.labels)
    return data


RESUME_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(work_dir: Path) -> str | None:
    """Newest ``checkpoint-N`` that was written to the end (a kill while saving leaves a partial one).

    Trainer writes ``trainer_state.json`` last, so its presence marks a finished save.
    """
    candidates = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for folder in reversed(candidates):
        missing = [name for name in RESUME_FILES if not (folder / name).is_file()]
        if not missing:
            return str(folder)
        logger.warning("skipping incomplete checkpoint %s (missing %s)", folder, ", ".join(missing))
    return None


def resume_point(args: TrainArguments) -> str | None:
    """The checkpoint to resume from, refusing to silently clobber an earlier run."""
    last = last_complete_checkpoint(args.work_dir) if args.work_dir.is_dir() else None
    if args.resume:
        if last is None:
            logger.warning("--resume given but %s holds no checkpoint: starting from scratch", args.work_dir)
        return last
    if last is not None and not args.overwrite_output_dir:
        raise ValueError(
            f"{args.work_dir} holds checkpoints of an earlier run ({Path(last).name}): "
            "pass --resume to continue it or --overwrite_output_dir to start over"
        )
    if args.overwrite_output_dir and args.work_dir.is_dir():
        shutil.rmtree(args.work_dir)
    return None


class BatchMixer:
    """With probability ``prob``, MixUp (alpha 0.2) or CutMix (alpha 1.0) a batch into soft targets."""

    def __init__(self, num_classes: int, prob: float) -> None:
        self.prob = prob
        self.ops = (v2.MixUp(alpha=0.2, num_classes=num_classes), v2.CutMix(alpha=1.0, num_classes=num_classes))

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if float(torch.rand(())) >= self.prob:
            return inputs
        op = self.ops[int(torch.randint(0, 2, ()))]
        pixels, labels = op(inputs["pixel_values"], inputs["labels"])
        return {**inputs, "pixel_values": pixels, "labels": labels}


def layer_decay_groups(model: Any, learning_rate: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups whose learning rate shrinks by ``layer_decay`` per stage towards the stem."""
    from timm.optim import param_groups_layer_decay

    timm_model = getattr(model, "timm_model", None)
    if timm_model is None:
        raise ValueError(f"--layer_decay needs a timm-backed model (efficientnet_lite0/1/2 or a timm/ Hub id), not {type(model).__name__}")
    groups = param_groups_layer_decay(timm_model, weight_decay=weight_decay, layer_decay=layer_decay)
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": learning_rate * g.get("lr_scale", 1.0)} for g in groups]


class WeightEMA(TrainerCallback):
    """Exponential moving average of the weights, swapped in for each epoch-end evaluation and save.

    The Trainer evaluates and saves right after ``on_epoch_end``, so the selected and saved model
    is the average; ``on_epoch_begin`` swaps the raw weights back before training continues.
    The decay warms up as (1 + t) / (10 + t), so early averages do not cling to the ImageNet start.
    """

    def __init__(self, decay: float) -> None:
        self.decay, self.shadow, self.updates, self.swapped = decay, None, 0, False

    def _tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.dtype.is_floating_point]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        current = self._tensors(model)
        if self.shadow is None:
            self.shadow = [t.detach().clone() for t in current]
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [t.detach() for t in current], 1 - decay)

    def _swap(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for live, average in zip(self._tensors(model), self.shadow):
                scratch = live.clone()
                live.copy_(average)
                average.copy_(scratch)
        self.swapped = not self.swapped

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.shadow is not None and not self.swapped:
            self._swap(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.swapped:
            self._swap(model)


class BoneBreakTrainer(Trainer):
    """Trainer plus batch mixing, layer-wise learning-rate decay and class-balanced sampling (all off by default)."""

    def __init__(
        self, *args: Any, mixer: BatchMixer | None = None, layer_decay: float = 1.0, balanced_labels: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # balanced_labels: the training images' classes, given when sampling is to be class-balanced
        self.mixer, self.layer_decay, self.balanced_labels = mixer, layer_decay, balanced_labels

    def _get_train_sampler(self, train_dataset=None):
        if self.balanced_labels is None:
            return super()._get_train_sampler(train_dataset)
        labels = self.balanced_labels
        counts = np.bincount(labels)
        generator = torch.Generator().manual_seed(self.args.seed)  # the same draw on every process
        return torch.utils.data.WeightedRandomSampler(1.0 / counts[labels], num_samples=len(labels), replacement=True, generator=generator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mixer is not None and model.training:
            inputs = self.mixer(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.layer_decay >= 1.0 or self.optimizer is not None:
            return super().create_optimizer(model)
        groups = layer_decay_groups(model or self.model, self.args.learning_rate, self.args.weight_decay, self.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                           eps=self.args.adam_epsilon)
        return self.optimizer


def model_inputs(split: datasets.Dataset, transform: Any, cache: bool, targets: np.ndarray | None = None) -> Any:
    """The split as Trainer inputs, decoded once into memory or on every read (``targets``: soft labels)."""
    return DecodedImages(split, transform, targets) if cache else split.with_transform(batch_transform(transform))


def distillation_targets(split: datasets.Dataset, labels: list[str], teachers: list[str], weight: float) -> np.ndarray:
    """(1 - weight) x one-hot true label + weight x the teachers' mean calibrated probabilities."""
    from .evaluate import label_index_map

    ensemble = Ensemble(teachers)
    if sorted(ensemble.labels) != sorted(labels):
        raise ValueError(f"--distill_from teachers know {ensemble.labels}, the data has {labels}")
    logger.info("distillation: %d teacher(s) label %d training images", len(teachers), len(split))
    teacher = ensemble.probabilities(image_paths(split))[:, label_index_map(labels, ensemble.labels)]  # to the data's label order
    onehot = np.eye(len(labels), dtype=np.float32)[np.asarray(split["label"])]
    return ((1 - weight) * onehot + weight * teacher).astype(np.float32)


def build_trainer(args: TrainArguments, data: LoadedData, model: Any, processor: Any) -> Trainer:
    model.config.update({EQUALIZE_KEY: args.equalize})  # saved with the weights, so inference equalises too
    preprocess = preprocess_config_from_processor(processor, model.config)
    targets = None
    if args.distill_from:
        targets = distillation_targets(data.splits["train"], data.labels, args.distill_from, args.distill_weight)
    train = model_inputs(data.splits["train"], train_transform(preprocess, AugmentConfig(policy=args.augment)), args.cache_images, targets)
    validation = model_inputs(data.splits["validation"], eval_transform(preprocess), args.cache_images)
    train_labels = list(data.splits["train"]["label"])
    weights = class_weights(train_labels, len(data.labels)) if args.class_weighted_loss else None
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    if args.ema:
        callbacks.append(WeightEMA(args.ema))
    return BoneBreakTrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate,
        compute_metrics=make_compute_metrics(data.labels),
        compute_loss_func=make_loss(weights, args.label_smoothing),
        processing_class=processor,
        callbacks=callbacks,
        mixer=BatchMixer(len(data.labels), args.mixup) if args.mixup else None,
        layer_decay=args.layer_decay,
        balanced_labels=train_labels if args.balanced_sampling else None,
    )


def load_weights(model: Any, checkpoint: str | os.PathLike) -> None:
    """Copy a Trainer checkpoint's weights into ``model`` through ``from_pretrained``.

    Trainer's own resume and ``load_best_model_at_end`` feed the saved state dict straight
    into ``load_state_dict``; transformers 5 saves some models (ViT among them) under legacy
    key names, so that path silently skips most weights. ``from_pretrained`` converts them.
    """
    reloaded = type(model).from_pretrained(checkpoint, use_safetensors=True)
    model.load_state_dict(reloaded.state_dict(), strict=True)


def restore_best_model(trainer: Trainer) -> None:
    if trainer.state.best_model_checkpoint:
        load_weights(trainer.accelerator.unwrap_model(trainer.model), trainer.state.best_model_checkpoint)


def summarise(args: TrainArguments, data: LoadedData, trainer: Trainer, train_seconds: float, validation: dict) -> dict:
    state = trainer.state
    return {
        "model": args.model,
        "labels": data.labels,
        "data_dir": str(resolve_data_dir(args.data_dir)),
        "layout": data.layout,
        "grouped_splits": data.grouped,
        "counts": data.counts,
        "skipped_files": [{"path": str(p), "reason": r} for p, r in data.broken],
        "world_size": trainer.args.world_size,
        "device": str(trainer.args.device),
        "mixed_precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "no",
        "global_step": state.global_step,
        "epochs_run": state.epoch,
        "best_checkpoint": state.best_model_checkpoint,
        "train_seconds": round(train_seconds, 1),
        "validation": validation,
        "arguments": asdict(args),
    }


def calibrate(model: Any, processor: Any, data: LoadedData, out_dir: Path) -> tuple[Predictor, dict]:
    """Fit temperature and the X-ray check on validation; returns the calibrated predictor.

    The temperature is folded into the classifier head, so ``pipeline()`` and
    ``AutoModelForImageClassification`` users get the same calibrated probabilities as the app.
    """
    raw = Predictor(model, preprocess_config_from_processor(processor, model.config))
    result = calibrate_predictor(raw, image_paths(data.splits["train"]), image_paths(data.splits["validation"]),
                                 data.splits["validation"]["label"], out_dir)
    result["temperature_folded_into_head"] = fold_temperature(model, result["temperature"])
    raw.temperature = float(model.config.bonebreak_temperature)
    raw.ood = OODDetector.load(out_dir)
    return raw, result


def write_outputs(args: TrainArguments, data: LoadedData, trainer: Trainer, summary: dict, processor: Any) -> tuple[Path, dict]:
    """Calibrate, evaluate on validation and test, plot, write the model card, save atomically.

    Returns the saved folder and the evaluation report of each split."""
    # Without the mixed-precision wrapper: reports must come from the fp32 forward that users get
    # (measured: under bf16 autocast up to 3 of 108 clean-Test predictions came out differently).
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    splits = ["validation"] + ([s for s in ("test", "clean_test") if s in data.splits] if args.evaluate_test else [])
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        predictor, summary["calibration"] = calibrate(model, processor, data, scratch)
        reports = {
            split: run_evaluation(predictor, data.splits[split], data.labels, split, scratch / f"eval_{split}")
            for split in splits
        }
        for split in ("test", "clean_test"):
            if split in reports:
                summary[split] = {**headline(reports[split]), "ci95": reports[split]["ci95"], **({"note": reports[split]["note"]} if "note" in reports[split] else {})}
        ood = ood_check(predictor, data.splits["clean_test" if "clean_test" in data.splits else "validation"])
        if ood is not None:
            summary["ood"] = ood
        plot_training_curves(trainer.state.log_history, scratch / "training_curves.png")
        extra = {
            "metrics.json": json.dumps(summary, indent=2),
            "log_history.json": json.dumps(trainer.state.log_history, indent=2),
            "README.md": model_card.render(summary, reports),
        }
        extra.update({name: (scratch / name).read_bytes() for name in ("training_curves.png", "reliability_validation.png", OOD_FILE, "calibration.json")})
        model.to("cpu")
        saved = save_checkpoint(model, processor, args.output_dir, extra_files=extra,
                                extra_dirs={f"eval_{split}": scratch / f"eval_{split}" for split in splits})
    if args.export_onnx:
        try:
            export_onnx(saved)
        except Exception as error:  # the PyTorch checkpoint is complete and usable without it
            logger.warning("ONNX export failed, the app and CLI will run on PyTorch: %s", error)
    return saved, reports


def final_message(saved: Path, reports: dict[str, dict], train_seconds: float) -> str:
    """What a person needs at the end of a run: the scores, where the files are, how to serve it."""
    lines = [f"Trained in {train_seconds / 60:.1f} min. Best model (chosen by validation macro-F1), 95% bootstrap intervals:", "",
             comparison_table(reports), ""]
    if "test" in reports:
        lines.append("The published Test split of the bone-break dataset leaks near-duplicates of Train: read clean Test "
                     "where it is shown (see README 'Known leakage').")
    lines += [f"Model, reports and model card: {saved}/ (metrics.json, eval_*/, training_curves.png, README.md)",
              f"Serve it:   python app.py --model_path {saved}",
              f"Predict:    python -m bonebreak.predict --model_path {saved} PATH..."]
    return "\n".join(lines)


def run_training(args: TrainArguments, data: LoadedData | None = None) -> dict:
    """Train, select the best epoch by validation macro-F1, evaluate, save. Returns the summary."""
    args = with_output_dir(args)
    logger.info("training into %s (after an interruption, rerun the same command with --output_dir %s --resume)",
                args.output_dir, args.output_dir)
    set_seed(args.seed)
    data = data or prepare_data(args)
    model, processor = create_model(args.model, data.labels, args.image_size)
    checkpoint = resume_point(args)
    if checkpoint:
        load_weights(model, checkpoint)  # Trainer restores optimizer, scheduler, RNG and step
    trainer = build_trainer(args, data, model, processor)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - started
    restore_best_model(trainer)
    validation = trainer.evaluate()  # on every process: evaluation is collective under DDP
    summary = summarise(args, data, trainer, train_seconds, validation)
    if trainer.is_world_process_zero():
        saved, reports = write_outputs(args, data, trainer, summary, processor)
        print("\n" + final_message(saved, reports, train_seconds), flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary


def cv_fold_data(data: LoadedData, k: int, seed: int) -> list[LoadedData]:
    """Grouped, stratified k folds over the Train folder (train + validation of the manifest)."""
    from .audit import grouped_folds
    from .data import Sample, read_manifest_groups

    if not data.grouped:
        raise ValueError("--cv_folds needs the grouped split manifest (--split_manifest, see `python -m bonebreak.audit`)")
    pool = datasets.concatenate_datasets([data.splits["train"], data.splits["validation"]])
    paths = [Path(p) for p in image_paths(pool)]
    group_of = read_manifest_groups(data.manifest, data.root)
    labels = [data.labels[i] for i in pool["label"]]
    samples = [Sample(path, label, "train") for path, label in zip(paths, labels)]
    members: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        members.setdefault(group_of[path], []).append(i)
    fold_of = grouped_folds(samples, list(members.values()), k=k, seed=seed)
    folds = []
    for fold in range(k):
        held_out = [i for i, p in enumerate(paths) if fold_of[p] == fold]
        kept = [i for i, p in enumerate(paths) if fold_of[p] != fold]
        splits = datasets.DatasetDict({"train": pool.select(kept), "validation": pool.select(held_out)})
        counts = {name: split_counts_of(ds, data.labels) for name, ds in splits.items()}
        folds.append(LoadedData(splits, data.labels, counts, data.broken, data.layout, grouped=True))
    return folds


def run_cv(args: TrainArguments) -> dict:
    """Grouped k-fold cross-validation of the recipe: mean and spread of validation metrics."""
    args = with_output_dir(args)
    data = prepare_data(args)
    per_fold = []
    for fold, fold_data in enumerate(cv_fold_data(data, args.cv_folds, args.seed)):
        fold_args = replace(args, output_dir=str(Path(args.output_dir) / f"fold{fold}"), evaluate_test=False, cv_folds=0,
                            overwrite_output_dir=args.overwrite_output_dir or not args.resume)
        summary = run_training(fold_args, fold_data)
        per_fold.append({"fold": fold, "n_validation": len(fold_data.splits["validation"]), "train_seconds": summary["train_seconds"],
                         **{k.removeprefix("eval_"): v for k, v in summary["validation"].items() if k.endswith(("accuracy", "f1"))}})
        shutil.rmtree(fold_args.work_dir, ignore_errors=True)  # resumable state is not needed once a fold is done
    keys = [k for k in per_fold[0] if k.endswith(("accuracy", "f1"))]
    result = {
        "folds": args.cv_folds,
        "recipe": {k: v for k, v in asdict(args).items() if k not in ("output_dir", "cv_folds")},
        "per_fold": per_fold,
        "mean": {k: float(np.mean([f[k] for f in per_fold])) for k in keys},
        "std": {k: float(np.std([f[k] for f in per_fold], ddof=1)) for k in keys},
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "cv.json").write_text(json.dumps(result, indent=2))
    logger.info("grouped %d-fold CV: macro-F1 %.3f +- %.3f, accuracy %.3f +- %.3f", args.cv_folds, result["mean"]["macro_f1"],
                result["std"]["macro_f1"], result["mean"]["accuracy"], result["std"]["accuracy"])
    return result


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("LOCAL_RANK", "0")) == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args = parse_args(argv)
    return run_cv(args) if args.cv_folds else run_training(args)
