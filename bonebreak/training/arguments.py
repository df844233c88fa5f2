"""Every training setting, defined once: ``bonebreak train --help`` lists them all.

``HfArgumentParser((ModelArguments, DataArguments, BoneBreakTrainingArguments))``:
``BoneBreakTrainingArguments`` *is* ``transformers.TrainingArguments`` with its defaults set to
the shipped recipe (12 epochs, batch 32, AdamW at 5e-4 with weight decay 0.05, cosine schedule
with 5% warmup, label smoothing 0.1, evaluate and save every epoch, keep the best epoch by
validation macro-F1), plus the recipe options Transformers does not have. Every other Transformers
flag (``--gradient_accumulation_steps``, ``--report_to tensorboard``, ``--torch_compile``,
``--push_to_hub``, ...) reaches the Trainer unchanged.

Parsing only reads and checks: the device, the precision ``auto`` picks and the run folder are decided
when training starts (``setup.py``).

A recipe is a JSON file of ``field: value`` pairs (``recipes/*.json``); ``--recipe FILE``
applies it before the command-line flags, so flags override it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..common.argument_parser import argument_parser
from ..data.splits import check_fraction
from .augment import AUGMENT_POLICIES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SIMILAR_CASES_CHOICES = ("auto", "yes", "no")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class ModelArguments:
    model: str = field(
        default="efficientnet_lite0",
        metadata={"help": "efficientnet_lite0/1/2 (offline ImageNet weights), or any Hub id or local folder of an image-classification model."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Square input side in pixels (default: the model's own)."})
    equalize: bool = field(
        default=False,
        metadata={"help": "Histogram-equalise every radiograph before resizing, in training and (saved in the checkpoint) at inference."},
    )


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Dataset folder in Roboflow, Kaggle or plain <class>/ layout (default: $BONEBREAK_DATA, else data/bone-break)."},
    )
    split_manifest: str = field(
        default="auto",
        metadata={"help": "Leak-free grouped splits from `bonebreak audit`: a CSV path, 'auto' (splits/bone_break_manifest.csv "
                  "when it lists exactly the files of --data_dir) or 'none' (stratified random validation split)."},
    )
    val_fraction: float = field(
        default=0.15, metadata={"help": "Fraction of train held out (stratified, seeded) when no split manifest applies."}
    )
    dedup_groups: bool = field(default=False, metadata={"help": "Train on one image per near-duplicate group of the split manifest."})
    cache_images: bool = field(
        default=True,
        metadata={"help": "Decode every image once into memory (about 0.5 GB for this dataset) instead of once per epoch; "
                  "--cache_images False decodes them from disk on every read (datasets too large for memory)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N shuffled training images (quick experiments, tests)."}
    )
    exclude_file: str | None = field(default=None, metadata={"help": "CSV with a 'path' column (absolute or relative to --data_dir): "
                                     "training images to leave out (`bonebreak label-issues` writes some). Validation and Test keep them."})
    relabel_file: str | None = field(default=None, metadata={"help": "CSV with 'path' and 'label' (or 'suggested_label') columns: training "
                                     "images to train under another label. Validation and Test keep their original labels."})
    extra_train_dir: str | None = field(default=None, metadata={"help": "Class folders (<label>/<image>) of extra images added to "
                                        "the training split only, e.g. reviewed app feedback from `bonebreak feedback --apply`."})

    def __post_init__(self) -> None:
        check_fraction(self.val_fraction)


@dataclass
class BoneBreakTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the shipped recipe's defaults and BoneBreak's recipe options."""

    # --- Transformers settings, with the shipped recipe as their defaults ---
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the final model goes (default: a new folder runs/<model>-<date>-<time>, so no run replaces "
                  "another or the shipped model); resumable Trainer checkpoints go to <output_dir>.trainer/. An existing "
                  "non-empty folder is refused unless --overwrite_output_dir or --resume."},
    )
    num_train_epochs: float = field(
        default=12,
        metadata={"aliases": ["--epochs"], "help": "Maximum number of epochs (early stopping may end sooner). The default, with "
                  "patience 4, is the shipped recipe; 30 epochs measured no better (docs/experiments.md)."},
    )
    per_device_train_batch_size: int = field(
        default=32, metadata={"aliases": ["--batch_size"], "help": "Images per optimizer micro-step per process (GPU or CPU process)."}
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Images per evaluation step per process (default: the training batch size)."}
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup (Transformers SchedulerType)."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warmup: a number of steps, or a fraction of all steps when below 1."}
    )
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy loss."})
    eval_strategy: str = field(
        default="epoch", metadata={"help": "When to evaluate on validation: epoch, or steps (every --eval_steps; match --save_strategy)."}
    )
    save_strategy: str = field(
        default="epoch", metadata={"help": "When to save a resumable checkpoint: epoch, or steps (every --save_steps)."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Resumable checkpoints kept (the best one is always kept)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Finish with the best evaluated checkpoint, not the last."})
    metric_for_best_model: str | None = field(default="macro_f1", metadata={"help": "Validation metric that picks the best checkpoint."})
    greater_is_better: bool | None = field(default=True, metadata={"help": "Whether a larger --metric_for_best_model is better."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Where to log as well: none, tensorboard, wandb, mlflow, trackio, all, ..."}
    )
    dataloader_num_workers: int = field(
        default=2, metadata={"aliases": ["--num_workers"], "help": "Data-loading worker processes per training process."}
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep the data-loading workers alive between epochs (when there are any)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every dataset column (our datasets have no spare ones)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP: search for unused parameters (slower)."})

    # --- BoneBreak recipe options ---
    recipe: str | None = field(
        default=None,
        metadata={"help": "A JSON recipe of field: value pairs (e.g. recipes/mixup.json), applied before the other flags, which override it."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on GPUs and on CPUs with native bf16, i.e. AVX512-BF16 or AMX; otherwise fp16 on GPUs and "
                  "fp32 on CPUs), fp32, bf16 or fp16 (GPU only); sets --bf16/--fp16."},
    )
    early_stopping_patience: int = field(
        default=4, metadata={"help": "Stop after this many evaluations without a better validation macro-F1 (0: never)."}
    )
    class_weighted_loss: bool = field(
        default=True, metadata={"help": "Weight the loss by inverse class frequency (the classes are imbalanced up to 2:1)."}
    )
    augment: str = field(
        default="basic",
        metadata={"help": f"Augmentation policy: {', '.join(AUGMENT_POLICIES)} (basic: crop, flip, rotation, brightness/contrast; "
                  "the others add TrivialAugment or RandAugment on top)."},
    )
    mixup: float = field(
        default=0.0,
        metadata={"help": "Fraction of training batches mixed by timm's Mixup (MixUp alpha 0.2 or CutMix alpha 1.0, half each); 0 disables."},
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise learning-rate decay for timm-backed models (timm's param_groups_layer_decay): each earlier "
                  "stage learns this factor slower (e.g. 0.7); 1 disables."},
    )
    balanced_sampling: bool = field(
        default=False,
        metadata={"help": "Draw training images with probability inverse to their class frequency (instead of, or with, the weighted loss)."},
    )
    ema: float = field(
        default=0.0,
        metadata={"help": "Evaluate and keep an exponential moving average of the weights (timm's ModelEmaV3) with this decay "
                  "(e.g. 0.99); 0 disables. Needs --eval_strategy epoch; a resumed run restarts the average."},
    )
    distill_from: list[str] = field(
        default_factory=list,
        metadata={"help": "Teacher checkpoint folders: train on (1 - w) x the true label + w x their mean probabilities "
                  "(knowledge distillation). Teachers must not have trained on this run's validation or test images."},
    )
    distill_weight: float = field(default=0.5, metadata={"help": "w above: the teachers' share of each training target."})
    cv_folds: int = field(
        default=0,
        metadata={"aliases": ["--cv"], "help": "Instead of one model, run grouped stratified k-fold cross-validation over Train and write "
                  "<output_dir>/cv.json (needs the grouped split manifest; e.g. 5)."},
    )
    export_onnx: bool = field(
        default=True,
        metadata={"help": "Also write an ONNX copy (model.onnx, verified against PyTorch) that the app and CLI run on CPU by default."},
    )
    similar_cases: str = field(
        default="auto",
        metadata={"help": "Write the similar-cases index (similar_cases.safetensors: features and small thumbnails of the "
                  "training X-rays, shown beside each answer). auto: only for the shipped bone-break data (CC BY 4.0, credited); "
                  "yes: for your own data too (the index ships thumbnails of your images); no: never."},
    )
    evaluate_test: bool = field(
        default=True, metadata={"help": "After training, evaluate the best model on the test split (never used for selection)."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in <output_dir>.trainer/."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"aliases": ["--overwrite"],
                  "help": "Replace a non-empty --output_dir and start over even if <output_dir>.trainer/ holds checkpoints of an earlier run."},
    )

    def __post_init__(self) -> None:
        checks = {
            "--num_train_epochs/--epochs": self.num_train_epochs > 0,
            "--per_device_train_batch_size/--batch_size": self.per_device_train_batch_size >= 1,
            "--learning_rate": self.learning_rate > 0,
            "--warmup_steps": self.warmup_steps >= 0,
            "--label_smoothing_factor": 0 <= self.label_smoothing_factor < 1,
            "--dataloader_num_workers/--num_workers": self.dataloader_num_workers >= 0,
            "--early_stopping_patience": self.early_stopping_patience >= 0,
            "--cv_folds": self.cv_folds == 0 or self.cv_folds >= 2,
            "--mixup": 0 <= self.mixup <= 1,
            "--layer_decay": 0 < self.layer_decay <= 1,
            "--precision": self.precision in PRECISIONS,
            "--augment": self.augment in AUGMENT_POLICIES,
            "--similar_cases (auto, yes or no)": self.similar_cases in SIMILAR_CASES_CHOICES,
            "--ema": self.ema == 0 or 0 < self.ema < 1,
            "--distill_weight": 0 <= self.distill_weight <= 1,
        }
        bad = [flag for flag, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid value for {', '.join(bad)}; see `bonebreak train --help`")
        if self.distill_from and self.mixup:
            raise ValueError("--distill_from and --mixup both make soft targets: use one of them")
        if self.ema and str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "epoch":
            raise ValueError("--ema swaps the average in for epoch-end evaluations: keep --eval_strategy epoch or drop --ema")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume and --overwrite_output_dir contradict each other: pick one")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs the --output_dir of the run to continue (the folder printed when it started)")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.data_seed is None:
            self.data_seed = self.seed
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 contradict each other: pick one (or use --precision)")
        explicit = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if explicit and self.precision not in ("auto", explicit):
            raise ValueError(f"--precision {self.precision} contradicts --{explicit}: pass only one of them")
        self.dataloader_persistent_workers = self.dataloader_persistent_workers and self.dataloader_num_workers > 0
        given = self.output_dir
        super().__post_init__()
        self.output_dir = given  # Transformers would fill in "trainer_output"; setup.with_output_dir() picks a new run folder

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without ``--hub_token``: the Trainer writes these arguments as training_args.bin into every
        checkpoint and, with ``--push_to_hub``, uploads that file to the Hub repository."""
        return {**self.__dict__, "hub_token": None}

    @property
    def work_dir(self) -> Path:
        if not self.output_dir:
            raise ValueError("no --output_dir yet: call setup.set_up_run() first")
        return Path(f"{self.output_dir.rstrip('/')}.trainer")


ARGUMENT_TYPES = (ModelArguments, DataArguments, BoneBreakTrainingArguments)
Arguments = tuple[ModelArguments, DataArguments, BoneBreakTrainingArguments]


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file, or the name of one in recipes/ ("mixup" -> recipes/mixup.json)."""
    path = Path(name_or_path)
    if not path.is_file():  # a name, or a path relative to the repository (recipes/mixup.json) from elsewhere
        path = RECIPES_DIR / f"{name_or_path}.json" if path.suffix != ".json" else RECIPES_DIR.parent / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise ValueError(f"--recipe {name_or_path}: no such file (the shipped recipes in {RECIPES_DIR}: {known})")
    return path


def read_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a recipe file, checked by ``HfArgumentParser.parse_json_file`` (unknown or bad fields fail)."""
    path = recipe_path(name_or_path)
    try:
        argument_parser(*ARGUMENT_TYPES).parse_json_file(path)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--recipe {path}: {error}") from error
    return json.loads(path.read_text())


def parse_arguments(argv: list[str] | None = None, prog: str | None = None, description: str | None = None,
                    defaults: dict[str, Any] | None = None) -> Arguments:
    """The command line (default: sys.argv) into the three argument dataclasses: ``defaults`` (what the training set-up
    decided for this machine, ``setup.machine_defaults``), then ``--recipe FILE``, then the flags."""
    parser = argument_parser(*ARGUMENT_TYPES, prog=prog, description=description)
    parser.set_defaults(**(defaults or {}))
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--recipe")
    known, _ = early.parse_known_args(argv)
    if known.recipe:
        parser.set_defaults(**read_recipe(known.recipe))
    model, data, training = parser.parse_args_into_dataclasses(args=argv)
    return model, data, training


def arguments_record(model: ModelArguments, data: DataArguments, training: BoneBreakTrainingArguments) -> dict[str, Any]:
    """All settings of a run as one JSON-ready dict (tokens redacted by Transformers)."""
    record = {f.name: getattr(model, f.name) for f in fields(model)}
    record.update({f.name: getattr(data, f.name) for f in fields(data)})
    record.update(training.to_dict())
    return json.loads(json.dumps(record, default=str))
