"""Recipe options of issue #6 (mixing, layer decay, precision, dedup, TTA, EMA, balanced sampling,
equalisation) and the experiment runner, as real runs; their fast unit tests are in test_training_units.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bonebreak.commands import experiments
from bonebreak.data.preprocess import PreprocessConfig
from bonebreak.lab import runner as experiment_runs
from bonebreak.models.factory import create_model
from bonebreak.training.arguments import BoneBreakTrainingArguments, DataArguments, parse_arguments
from bonebreak.training.options import WeightAverage
from conftest import synthetic_xray


@pytest.mark.full_data  # the shipped manifest's near-duplicate groups only apply to the full dataset
def test_dedup_keeps_one_image_per_near_duplicate_group(real_data):
    from bonebreak.data.splits import read_manifest_groups
    from bonebreak.data.loading import image_paths
    from pathlib import Path

    from bonebreak.training.trainer import prepare_data

    data = prepare_data(DataArguments(data_dir=str(real_data)), 42)
    kept = prepare_data(DataArguments(data_dir=str(real_data), dedup_groups=True), 42)
    groups = read_manifest_groups(kept.manifest, kept.root)
    all_groups = {groups[Path(p)] for p in image_paths(data.splits["train"])}
    kept_groups = [groups[Path(p)] for p in image_paths(kept.splits["train"])]
    assert len(kept_groups) == len(set(kept_groups)) == len(all_groups) < len(data.splits["train"])
    assert len(kept.splits["validation"]) == len(data.splits["validation"])  # only train is thinned


def test_flip_tta_averages_the_mirror_image(trained_vit):
    from bonebreak.lab.runner import FlipAveraged
    from bonebreak.models.torch_backend import load_classifier

    plain = load_classifier(trained_vit, backend="torch", device="cpu")
    tta = load_classifier(trained_vit, backend="torch", device="cpu")
    tta.forward = FlipAveraged(tta.forward)  # how the experiment runner evaluates with flip test-time augmentation
    image = synthetic_xray(3)
    mirrored = image.transpose(0)  # PIL FLIP_LEFT_RIGHT
    expected = (plain.logits([image]) + plain.logits([mirrored])) / 2
    assert torch.allclose(torch.from_numpy(tta.logits([image])), torch.from_numpy(expected), atol=1e-4)


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
    assert "| mixup_rerun | `--mixup 0.5` |" in table and "do not edit the table by hand" in table
    assert record["inference"] == "fp32"
    with pytest.raises(ValueError, match="--reevaluate"):  # the finished re-evaluation migration is gone
        experiments.main(["--table", "--reevaluate"])


def test_ema_run_evaluates_and_saves_the_average(handful, tiny_vit, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from bonebreak.models.factory import create_model
    from bonebreak.training.trainer import build_trainer, prepare_data

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
    from bonebreak.commands.train import main
    from bonebreak.models.torch_backend import TorchForward, load_classifier
    from bonebreak.training.augment import eval_transform
    from bonebreak.training.trainer import build_trainer, prepare_data

    dark = synthetic_xray(3).point(lambda v: v // 4)  # an under-exposed film
    plain = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    equalised = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, equalize=True)
    assert eval_transform(equalised)(dark).max() > eval_transform(plain)(dark).max() + 0.5  # grey levels spread out

    out = tmp_path / "run"
    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
          "--num_workers", "0", "--equalize", "--ema", "0.9", "--balanced_sampling", "--class_weighted_loss", "false", "--export_onnx", "false"])
    predictor = load_classifier(out, device="cpu")
    assert predictor.preprocess.equalize and isinstance(predictor.forward, TorchForward)  # --export_onnx false: PyTorch serves it

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
    from bonebreak.commands.train import main
    from bonebreak.training.augment import collate
    from bonebreak.training.options import distillation_targets
    from bonebreak.training.trainer import prepare_data

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


def test_a_record_commit_is_dirty_for_code_changes_but_not_for_the_runners_own_outputs(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("docs/experiments.md", "benchmarks/results/old.json", "bonebreak/training/trainer.py"):
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
    (tmp_path / "bonebreak/training/trainer.py").write_text("v2\n")
    assert experiment_runs.git_commit(tmp_path) == clean + "+dirty"
