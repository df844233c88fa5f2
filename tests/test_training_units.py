"""Fast unit tests of training (no training run, no subprocess): argument parsing and recipes, what the machine decides
at run start, the recipe options, resuming, and cross-validation folds. The slow end-to-end runs are in test_training.py
and test_recipes.py (marked slow by conftest.SLOW_MODULES); these run under `pytest -m "not slow"`."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from bonebreak.commands import experiments
from bonebreak.data.loading import cv_fold_data, image_paths, load_splits
from bonebreak.data.preprocess import PreprocessConfig
from bonebreak.data.splits import read_manifest_groups
from bonebreak.lab import results_table as experiment_table
from bonebreak.lab import runner as experiment_runs
from bonebreak.models.factory import create_model
from bonebreak.training import trainer
from bonebreak.training.arguments import BoneBreakTrainingArguments, DataArguments, parse_arguments, read_recipe
from bonebreak.training.augment import AugmentConfig, train_transform
from bonebreak.training.options import WeightAverage, batch_mixer, class_weights, layer_decay_groups, make_loss, mix_batch
from bonebreak.training.setup import for_this_machine, machine_defaults, precision_of, resolve_precision, with_output_dir
from conftest import REPO, synthetic_xray, write_manifest


def parse_args(argv: list[str]):
    """The training arguments of a command line."""
    return parse_arguments(argv)[2]


# --- arguments and recipes (moved from test_training.py) ----------------------------------------------------------

def test_arguments_are_validated_with_the_flag_named():
    with pytest.raises(ValueError, match="--batch_size"):
        parse_args(["--batch_size", "0"])
    with pytest.raises(ValueError, match="--val_fraction"):
        DataArguments(val_fraction=1.0)
    with pytest.raises(ValueError, match="--resume needs the --output_dir"):
        parse_args(["--resume"])
    args = parse_args(["--epochs", "50", "--batch_size", "32", "--learning_rate", "1e-3", "--seed", "7", "--resume", "--output_dir", "r"])
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (50, 32, 32)
    assert (args.learning_rate, args.seed, args.data_seed, args.resume) == (1e-3, 7, 7, True)
    with pytest.raises(ValueError, match="--resume.*--overwrite_output_dir"):
        parse_args(["--resume", "--output_dir", "r", "--overwrite_output_dir"])


def test_default_output_is_a_new_run_folder_and_a_full_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = with_output_dir(parse_args([]), "google/vit-base-patch16-224")
    assert args.output_dir.startswith(os.path.join("runs", "vit-base-patch16-224-20"))  # runs/<model>-<date>-<time>
    assert parse_args([]).output_dir is None  # never the shipped checkpoints/bone_break_model by default
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_text("a trained model")
    with pytest.raises(ValueError, match=f"--output_dir {full} is not empty"):
        with_output_dir(parse_args(["--output_dir", str(full)]), "m")
    assert with_output_dir(parse_args(["--output_dir", str(full), "--overwrite"]), "m").output_dir == str(full)
    assert with_output_dir(parse_args(["--output_dir", str(tmp_path / "empty")]), "m").output_dir == str(tmp_path / "empty")


def test_class_weights_balance_the_loss():
    weights = class_weights([0, 0, 0, 1], 3).numpy()
    assert weights[0] * 3 == pytest.approx(weights[1] * 1) and weights[2] == 0.0


def test_recipe_file_then_flags(tmp_path):
    model_args, _, args = parse_arguments(["--recipe", str(REPO / "recipes" / "long.json")])
    assert (args.num_train_epochs, args.early_stopping_patience, args.recipe) == (30, 8, str(REPO / "recipes" / "long.json"))
    _, _, args = parse_arguments(["--recipe", "recipes/long.json", "--epochs", "5", "--mixup", "0.2"])
    assert (args.num_train_epochs, args.early_stopping_patience, args.mixup) == (5, 8, 0.2)  # flags override the file
    assert parse_arguments(["--recipe", "lite1"])[0].model == "efficientnet_lite1"  # a name in recipes/
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(ValueError, match=f"--recipe {bad}.*epochz"):
        parse_arguments(["--recipe", str(bad)])
    bad.write_text(json.dumps({"mixup": 3.0}))
    with pytest.raises(ValueError, match="--mixup"):
        parse_arguments(["--recipe", str(bad)])
    with pytest.raises(ValueError, match="--precision fp32 contradicts --bf16"):
        parse_args(["--precision", "fp32", "--bf16"])
    with pytest.raises(ValueError, match="--eval_strategy epoch"):
        parse_args(["--ema", "0.9", "--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", "5"])


def test_parsing_leaves_the_device_and_precision_to_the_run_start():
    """Parsing only reads the flags; setup.for_this_machine turns --precision into --bf16/--fp16 and sets --use_cpu
    where there is no GPU, once, when a run starts."""
    cuda = torch.cuda.is_available()
    parsed = parse_args(["--precision", "bf16"])
    assert not parsed.bf16 and not parsed.fp16 and not parsed.use_cpu  # untouched by parsing
    machine = for_this_machine(parsed)
    assert machine.bf16 and not machine.fp16 and machine.use_cpu == (not cuda) and precision_of(machine) == "bf16"
    fp32 = for_this_machine(parse_args(["--precision", "fp32"]))
    assert not fp32.bf16 and not fp32.fp16 and precision_of(fp32) == "fp32"
    assert precision_of(for_this_machine(parse_args([]))) == resolve_precision("auto", cuda)  # --precision auto
    # Transformers' own --bf16 still works; `bonebreak train` parses with machine_defaults(), which says use_cpu on a
    # machine without a GPU before TrainingArguments checks --bf16 against the device
    explicit = parse_arguments(["--bf16"], defaults=machine_defaults())[2]
    assert for_this_machine(explicit).bf16 and precision_of(for_this_machine(explicit)) == "bf16"
    if not cuda:
        with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU"):
            for_this_machine(parse_arguments(["--fp16"], defaults=machine_defaults())[2])


# --- recipe options and the experiment runner (moved from test_recipes.py) -----------------------------------------

def test_mixer_makes_soft_targets_the_loss_accepts():
    import numpy as np

    np.random.seed(0)  # timm's Mixup draws from numpy
    inputs = {"pixel_values": torch.rand(6, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3, 4, 5])}
    mixed = mix_batch(batch_mixer(num_classes=10, prob=1.0), {**inputs, "pixel_values": inputs["pixel_values"].clone()})
    assert mixed["labels"].shape == (6, 10)
    assert torch.allclose(mixed["labels"].sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed["pixel_values"], inputs["pixel_values"])
    loss = make_loss(torch.ones(10), 0.1)
    logits = type("Out", (), {"logits": torch.randn(6, 10)})()
    assert torch.isfinite(loss(logits, mixed["labels"])) and torch.isfinite(loss(logits, inputs["labels"]))
    kept = mix_batch(batch_mixer(10, prob=0.0), {**inputs, "pixel_values": inputs["pixel_values"].clone()})
    assert torch.equal(kept["pixel_values"], inputs["pixel_values"]) and torch.equal(kept["labels"].argmax(1), inputs["labels"])
    odd = {"pixel_values": torch.rand(5, 3, 8, 8), "labels": torch.arange(5)}
    assert mix_batch(batch_mixer(10, prob=1.0), odd) is odd  # timm mixes pairs: an odd last batch is left alone


def test_layer_decay_slows_the_stem_and_rejects_non_timm_models(tiny_vit):
    model, _ = create_model("efficientnet_lite0", [f"c{i}" for i in range(10)], 64)
    groups = layer_decay_groups(model, 1e-3, 0.05, 0.5)
    lrs = [g["lr"] for g in groups]
    assert max(lrs) == pytest.approx(1e-3) and min(lrs) < 1e-5
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    stem = model.timm_model.conv_stem.weight
    head = model.timm_model.classifier.weight
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(stem)] < lr_of[id(head)]
    vit, _ = create_model(str(tiny_vit), [f"c{i}" for i in range(10)])
    with pytest.raises(ValueError, match="--layer_decay"):
        layer_decay_groups(vit, 1e-3, 0.05, 0.5)


def test_precision_choice():
    assert resolve_precision("fp32", cuda=False) == "fp32"
    assert resolve_precision("auto", cuda=False) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False)
    for flag, value in (("--precision", "fp8"), ("--augment", "wild"), ("--mixup", 2.0), ("--layer_decay", 0.0)):
        with pytest.raises(ValueError, match=flag):
            BoneBreakTrainingArguments(**{flag[2:]: value})


def test_saved_training_arguments_leave_the_hub_token_out(tmp_path):
    """The Trainer saves its arguments (training_args.bin) in every checkpoint and pushes that file with --push_to_hub."""
    _, _, args = parse_arguments(["--push_to_hub", "--hub_model_id", "someone/x", "--hub_token", "hf_secret123"])
    torch.save(args, tmp_path / "training_args.bin")
    assert b"hf_secret123" not in (tmp_path / "training_args.bin").read_bytes()
    saved = pickle.loads(pickle.dumps(args))  # what torch.save pickled, without unpickling a file (weights-only loading rule)
    assert saved.hub_token is None and saved.hub_model_id == "someone/x" and saved.push_to_hub
    assert args.hub_token == "hf_secret123"  # the running Trainer keeps it for its own uploads


def test_augmentation_policies_give_model_sized_tensors():
    cfg = PreprocessConfig(image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    for policy in ("basic", "trivial", "randaugment"):
        out = train_transform(cfg, AugmentConfig(policy=policy))(synthetic_xray(1))
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="--augment: unknown policy .nope."):
        AugmentConfig(policy="nope")


def test_every_recipe_is_a_valid_training_command():
    assert {"baseline", "mixup", "long", "distill", "ema"} <= set(experiments.RECIPES)
    assert read_recipe("baseline") == {}  # the shipped recipe is the defaults
    exp = experiments.ExperimentArguments(recipes=list(experiments.RECIPES))
    defaults = parse_arguments([])
    for name in experiments.RECIPES:
        arguments = experiment_runs.recipe_arguments(name, exp, 42)
        for key, value in read_recipe(name).items():
            (owner,) = [a for a in arguments if hasattr(a, key)]
            assert getattr(owner, key) == value, (name, key)
        assert arguments[2].num_train_epochs == read_recipe(name).get("num_train_epochs", defaults[2].num_train_epochs)
        assert arguments[2].output_dir.endswith(f"{name}-seed42") and experiment_runs.run_name(name, exp) == name
    flagged = experiments.ExperimentArguments(recipes=["baseline"], train_flags="--dataloader_num_workers 7 --torch_compile")
    _, _, args = experiment_runs.recipe_arguments("baseline", flagged, 42)
    assert args.dataloader_num_workers == 7 and args.torch_compile  # extra Trainer flags reach every run
    rerun = experiments.ExperimentArguments(recipes=["baseline"], name="baseline_rerun", cv=5)
    assert experiment_runs.recipe_arguments("baseline", rerun, 43)[2].output_dir.endswith("baseline_rerun-cv5-seed43")
    assert experiment_runs.run_name("baseline", rerun) == "baseline_rerun"
    with pytest.raises(ValueError, match="--name baseline_rerun names the runs of one recipe, but --recipes has 2"):
        experiments.ExperimentArguments(recipes=["baseline", "lite1"], name="baseline_rerun")
    with pytest.raises(ValueError, match="--name baseline is another recipe's name.*lite1_rerun"):
        experiments.ExperimentArguments(recipes=["lite1"], name="baseline")  # would be paired as the reference
    with pytest.raises(ValueError, match="both the --recipes runs and the --ensemble record"):
        experiments.ExperimentArguments(recipes=["lite1"], ensemble=["a", "b"], name="lite1_rerun")
    with pytest.raises(ValueError, match="unknown recipe"):
        experiments.ExperimentArguments(recipes=["magic"])
    with pytest.raises(ValueError, match="--recipes"):
        experiments.ExperimentArguments()


def test_weight_ema_averages_and_swaps_around_evaluation():
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightAverage(decay=0.5)
    ema.on_train_begin(None, None, None, model=model)  # timm's ModelEmaV3 copies the model
    ema.on_step_end(None, SimpleNamespace(global_step=1), None, model=model)  # first update: the average is the weights
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)  # warm-up decay 1 - 1/1.1 = 1/11: 0 -> 10/11
    ema.on_epoch_end(None, None, None, model=model)
    assert torch.allclose(model.weight, torch.full((1, 2), 10 / 11))  # evaluated and saved: the average
    ema.on_epoch_begin(None, None, None, model=model)
    assert torch.allclose(model.weight, torch.ones(1, 2))  # training continues from the raw weights
    with pytest.raises(ValueError, match="--ema"):
        BoneBreakTrainingArguments(ema=1.5)


def test_the_committed_table_is_generated_from_the_committed_records():
    """docs/experiments.md says "do not edit the table by hand": everything above the hand-written notes (which
    `--table` keeps) must be exactly what `--table` renders."""
    root = experiment_runs.ROOT
    rendered = experiment_table.render_table(experiment_table.load_records(root / "benchmarks" / "results"))
    table, marker, _ = (root / "docs" / "experiments.md").read_text().partition(experiment_table.NOTES_MARKER)
    assert table == (rendered + "\n" if marker else rendered), "run: bonebreak experiments --table"


# --- resuming: <output_dir>.trainer/ --------------------------------------------------------------------------------


def fake_checkpoint(work_dir: Path, step: int) -> Path:
    """A checkpoint folder that last_complete_checkpoint takes as complete: every file of trainer.RESUME_FILES."""
    folder = work_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in trainer.RESUME_FILES:
        (folder / name).write_text("x")
    return folder


def test_checkpoints_of_an_earlier_run_are_refused_resumed_or_removed(tmp_path):
    """The fast version of test_training's rerun test: training must not silently clobber, or silently continue,
    the checkpoints an earlier run left in <output_dir>.trainer/."""
    out = tmp_path / "run"
    args = parse_args(["--output_dir", str(out)])
    assert args.work_dir == tmp_path / "run.trainer"
    assert trainer.resume_point(args) is None  # nothing there yet: a fresh start
    fake_checkpoint(args.work_dir, 5)
    newest = fake_checkpoint(args.work_dir, 10)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-10\).*--resume.*--overwrite_output_dir"):
        trainer.resume_point(args)
    assert newest.is_dir()  # refused, not removed
    assert trainer.resume_point(parse_args(["--output_dir", str(out), "--resume"])) == str(newest)
    assert trainer.resume_point(parse_args(["--output_dir", str(out), "--overwrite_output_dir"])) is None
    assert not args.work_dir.exists()  # --overwrite_output_dir starts over
    assert trainer.resume_point(args) is None


def test_resume_skips_a_checkpoint_that_was_cut_off_while_saving(tmp_path):
    args = parse_args(["--output_dir", str(tmp_path / "run"), "--resume"])
    complete = fake_checkpoint(args.work_dir, 5)
    partial = args.work_dir / "checkpoint-10"
    partial.mkdir()
    (partial / "model.safetensors").write_text("half")  # killed before trainer_state.json was written
    assert trainer.resume_point(args) == str(complete)
    with pytest.raises(ValueError, match="checkpoint-5"):
        trainer.resume_point(parse_args(["--output_dir", str(tmp_path / "run")]))
    assert trainer.resume_point(parse_args(["--output_dir", str(tmp_path / "empty"), "--resume"])) is None  # nothing to resume


# --- cross-validation folds ---------------------------------------------------------------------------------------


def test_cv_folds_hold_out_whole_near_duplicate_groups(handful, tmp_path):
    """--cv_folds: every Train image is held out exactly once, and the images of one near-duplicate group (the
    manifest's group column) are held out together, so no fold model validates on a near-copy of its training images."""
    manifest = write_manifest(handful, tmp_path / "manifest.csv")  # pairs of files share a group
    data = load_splits(handful, split_manifest=manifest)
    group_of = read_manifest_groups(manifest, data.root)
    pool = [Path(p) for split in ("train", "validation") for p in image_paths(data.splits[split])]
    members: dict[str, set[Path]] = {}
    for path in pool:
        members.setdefault(group_of[path], set()).add(path)
    shared = [group for group in members.values() if len(group) >= 2]
    assert len(shared) >= 5  # the fixture has groups to split, or this test would prove nothing

    folds = cv_fold_data(data, k=3, seed=42)
    assert len(folds) == 3
    held_out = [[Path(p) for p in image_paths(fold.splits["validation"])] for fold in folds]
    assert sorted(p for fold in held_out for p in fold) == sorted(pool)  # each image held out exactly once
    fold_of = {path: i for i, fold in enumerate(held_out) for path in fold}
    split_groups = [sorted(p.name for p in group) for group in shared if len({fold_of[p] for p in group}) > 1]
    assert split_groups == [], f"near-duplicate groups straddling folds: {split_groups}"
    for fold in folds:  # within a fold: train and validation never share a group
        train_groups = {group_of[Path(p)] for p in image_paths(fold.splits["train"])}
        validation_groups = {group_of[Path(p)] for p in image_paths(fold.splits["validation"])}
        assert not train_groups & validation_groups and fold.grouped
        assert len(fold.splits["train"]) + len(fold.splits["validation"]) == len(pool)
    with pytest.raises(ValueError, match="--cv_folds needs the grouped split manifest"):
        cv_fold_data(load_splits(handful, split_manifest="none"), k=3, seed=42)
