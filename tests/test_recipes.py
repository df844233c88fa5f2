"""Recipe options of issue #6 (mixing, layer decay, precision, dedup, TTA, EMA, balanced sampling,
equalisation) and the experiment runner."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bonebreak import experiment_runs, experiment_table, experiments
from bonebreak.models import create_model
from bonebreak.arguments import BoneBreakTrainingArguments, DataArguments, parse_arguments, read_recipe, resolve_precision
from bonebreak.recipe_extras import WeightAverage, batch_mixer, layer_decay_groups, make_loss, mix_batch
from bonebreak.transforms import AugmentConfig, PreprocessConfig, train_transform
from conftest import synthetic_xray


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


def test_augmentation_policies_give_model_sized_tensors():
    cfg = PreprocessConfig(image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    for policy in ("basic", "trivial", "randaugment"):
        out = train_transform(cfg, AugmentConfig(policy=policy))(synthetic_xray(1))
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        AugmentConfig(policy="nope")


@pytest.mark.full_data  # the shipped manifest's near-duplicate groups only apply to the full dataset
def test_dedup_keeps_one_image_per_near_duplicate_group(real_data):
    from bonebreak.splits import read_manifest_groups
    from bonebreak.data import image_paths
    from pathlib import Path

    from bonebreak.training import prepare_data

    data = prepare_data(DataArguments(data_dir=str(real_data)), 42)
    kept = prepare_data(DataArguments(data_dir=str(real_data), dedup_groups=True), 42)
    groups = read_manifest_groups(kept.manifest, kept.root)
    all_groups = {groups[Path(p)] for p in image_paths(data.splits["train"])}
    kept_groups = [groups[Path(p)] for p in image_paths(kept.splits["train"])]
    assert len(kept_groups) == len(set(kept_groups)) == len(all_groups) < len(data.splits["train"])
    assert len(kept.splits["validation"]) == len(data.splits["validation"])  # only train is thinned


def test_flip_tta_averages_the_mirror_image(trained_vit):
    from bonebreak.inference import Predictor

    plain = Predictor.from_checkpoint(trained_vit, device="cpu")
    tta = Predictor.from_checkpoint(trained_vit, device="cpu", tta=True)
    image = synthetic_xray(3)
    mirrored = image.transpose(0)  # PIL FLIP_LEFT_RIGHT
    expected = (plain.logits([image]) + plain.logits([mirrored])) / 2
    assert torch.allclose(torch.from_numpy(tta.logits([image])), torch.from_numpy(expected), atol=1e-4)


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


def test_runner_trains_records_and_tabulates(handful, tmp_path):
    # --name: the runs of one recipe recorded under another name (a repeat that must not supersede the original)
    experiments.main(["--recipes", "mixup", "--name", "mixup_rerun", "--data_dir", str(handful), "--epochs", "1",
                      "--results_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work"),
                      "--table_path", str(tmp_path / "table.md")])
    (path,) = (tmp_path / "results").glob("*.json")
    record = json.loads(path.read_text())
    assert record["recipe"] == "mixup_rerun" and record["trains_recipe"] == "mixup" and record["kind"] == "split"
    assert record["arguments"]["mixup"] == 0.5 and (tmp_path / "work" / "mixup_rerun-seed42" / "metrics.json").is_file()
    for split in ("validation", "test", "validation_tta", "test_tta"):
        assert 0 <= record[split]["accuracy"] <= 1 and len(record[split]["ci95"]["macro_f1"]) == 2
    assert record["commit"] and record["wall_seconds"] > 0
    assert record["machine"]["gpu"] is None and record["train_flags"] == "" and record["note"] is None
    table = (tmp_path / "table.md").read_text()
    assert "| mixup_rerun | `--mixup 0.5` |" in table and "do not edit by hand" in table
    assert record["inference"] == "fp32"
    with pytest.raises(ValueError, match="--reevaluate"):  # the finished re-evaluation migration is gone
        experiments.main(["--table", "--reevaluate"])


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


def test_ema_run_evaluates_and_saves_the_average(handful, tiny_vit, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from bonebreak.models import create_model
    from bonebreak.training import build_trainer, prepare_data

    model_args, data_args, args = parse_arguments(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1",
                                                   "--batch_size", "8", "--num_workers", "0", "--ema", "0.9",
                                                   "--output_dir", str(tmp_path / "ema")])
    data = prepare_data(data_args, args.seed)
    model, processor = create_model(model_args.model, data.labels)
    trainer = build_trainer(model_args, data_args, args, data, model, processor)
    trainer.train()
    (average,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, WeightAverage)]
    assert average.swapped  # the last epoch ended with the average in the model
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    raw = average.ema.module.state_dict()  # holds the raw weights while the average is swapped in
    key = next(k for k in live if k.endswith("classifier.weight"))
    assert torch.equal(saved[key], live[key]) and not torch.equal(saved[key], raw[key])


def test_equalisation_is_trained_saved_and_used_at_inference(handful, tiny_vit, tmp_path):
    from bonebreak.inference import Predictor
    from bonebreak.training import build_trainer, main, prepare_data
    from bonebreak.transforms import eval_transform

    dark = synthetic_xray(3).point(lambda v: v // 4)  # an under-exposed film
    plain = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    equalised = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, equalize=True)
    assert eval_transform(equalised)(dark).max() > eval_transform(plain)(dark).max() + 0.5  # grey levels spread out

    out = tmp_path / "run"
    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
          "--num_workers", "0", "--equalize", "--ema", "0.9", "--balanced_sampling", "--class_weighted_loss", "false", "--export_onnx", "false"])
    predictor = Predictor.from_checkpoint(out, device="cpu")
    assert predictor.preprocess.equalize and predictor.backend == "torch"

    # Balanced sampling: with one class 4x over-represented, draws come out near-uniform.
    model_args, data_args, args = parse_arguments(["--data_dir", str(handful), "--balanced_sampling", "--model", str(tiny_vit),
                                                   "--output_dir", str(tmp_path / "sampler")])
    data = prepare_data(data_args, args.seed)
    train = data.splits["train"]
    keep = [i for i, label in enumerate(train["label"]) if label != 0] + [i for i, label in enumerate(train["label"]) if label == 0] * 4
    data.splits["train"] = train.select(keep)
    model, processor = create_model(str(tiny_vit), data.labels)
    trainer = build_trainer(model_args, data_args, args, data, model, processor)
    drawn = torch.tensor(list(trainer._get_train_sampler()))
    labels = torch.tensor(trainer.train_dataset.labels)[drawn]
    share_of_first = float((labels == 0).float().mean())
    assert share_of_first < 2.5 / len(data.labels)  # unbalanced it would be 4x the share of any other class
    from dataclasses import replace

    streamed = build_trainer(model_args, replace(data_args, cache_images=False), args, data, model, processor)  # labels come from the data, not the dataset type
    assert list(streamed._get_train_sampler()) == drawn.tolist()


def test_ensemble_record_averages_members_and_costs_their_latency(handful, trained_vit, tmp_path):
    experiments.main(["--ensemble", str(trained_vit), str(trained_vit), "--name", "twins", "--data_dir", str(handful), "--seed", "7",
                      "--results_dir", str(tmp_path / "results"), "--table_path", str(tmp_path / "table.md")])
    (path,) = (tmp_path / "results").glob("*.json")
    record = json.loads(path.read_text())
    assert record["kind"] == "ensemble" and len(record["members"]) == 2
    trained_seed = json.loads((trained_vit / "metrics.json").read_text())["arguments"]["seed"]
    assert record["seed"] == trained_seed != 7 and path.name.endswith(f"-seed{trained_seed}.json")  # filed under the members' seed
    assert record["test"]["accuracy"] == record["test_single_members"][0]["accuracy"]  # two identical members
    assert record["latency_ms_per_image"]["ensemble"] > 0
    assert "| twins | 2 |" in (tmp_path / "table.md").read_text()
    with pytest.raises(ValueError, match="at least 2"):
        experiments.ExperimentArguments(ensemble=[str(trained_vit)])


def test_distillation_mixes_true_labels_with_teacher_probabilities(handful, tiny_vit, trained_vit, tmp_path):
    from bonebreak.recipe_extras import distillation_targets
    from bonebreak.training import main, prepare_data
    from bonebreak.transforms import collate

    data = prepare_data(DataArguments(data_dir=str(handful)), 42)
    split = data.splits["train"]
    hard = distillation_targets(split, data.labels, [str(trained_vit)], weight=0.0)
    assert (hard.argmax(1) == split["label"]).all() and (hard.max(1) == 1).all()
    soft = distillation_targets(split, data.labels, [str(trained_vit)] * 2, weight=0.5)
    assert soft.sum(1) == pytest.approx(1.0, abs=1e-5) and (soft.max(1) < 1).all() and (soft.max(1) >= 0.5).all()
    batch = collate([{"pixel_values": torch.zeros(3, 4, 4), "labels": row} for row in soft[:2]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, len(data.labels))

    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(tmp_path / "student"),
          "--num_workers", "0", "--distill_from", str(trained_vit), "--export_onnx", "false", "--no_evaluate_test"])
    assert (tmp_path / "student" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="--mixup"):
        BoneBreakTrainingArguments(distill_from=[str(trained_vit)], mixup=0.5)


def test_the_committed_table_is_generated_from_the_committed_records():
    """docs/experiments.md says "do not edit by hand": it must be exactly what `--table` renders."""
    root = experiment_runs.ROOT
    rendered = experiment_table.render_table(experiment_table.load_records(root / "benchmarks" / "results"))
    assert (root / "docs" / "experiments.md").read_text() == rendered, "run: python -m bonebreak.experiments --table"


def test_a_record_commit_is_dirty_for_code_changes_but_not_for_the_runners_own_outputs(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("docs/experiments.md", "benchmarks/results/old.json", "bonebreak/training.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    clean = experiment_runs.git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "docs/experiments.md").write_text("regenerated\n")
    (tmp_path / "benchmarks/results/old.json").write_text("rewritten\n")
    (tmp_path / "benchmarks/results/new.json").write_text("{}\n")
    assert experiment_runs.git_commit(tmp_path) == clean  # the runner wrote these itself
    (tmp_path / "bonebreak/training.py").write_text("v2\n")
    assert experiment_runs.git_commit(tmp_path) == clean + "+dirty"
