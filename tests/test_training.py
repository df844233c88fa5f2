"""Real 1-epoch training runs on real X-rays: tiny ViT/ConvNeXt and EfficientNet-Lite0 (the fast unit tests of training
are in test_training_units.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from bonebreak.commands import experiments
from bonebreak.commands.train import main
from bonebreak.evaluation.reports import read_probabilities, write_probabilities
from bonebreak.lab import runner as experiment_runs
from bonebreak.training.arguments import parse_arguments
from bonebreak.training.setup import cpu_has_native_bf16
from bonebreak.training.trainer import build_trainer, prepare_data
from conftest import REPO, gradient16, make_dicom, write_manifest

N_TRAIN, N_VAL, N_TEST = 20, 10, 10  # the handful: 3 train/class minus 1 carved for validation


def check_run(out: Path, expected_steps: int) -> dict:
    from transformers import pipeline

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"][0] == "Avulsion" and len(metrics["labels"]) == 10
    assert sum(metrics["counts"]["train"].values()) == N_TRAIN
    assert metrics["global_step"] == expected_steps
    assert 0.0 <= metrics["validation"]["eval_macro_f1"] <= 1.0
    assert metrics["train_images_per_second"] > 0 and metrics["accelerator"] is None and metrics["peak_gpu_memory_gib"] is None
    # 40 of the 1,129 images: the shipped audit manifest does not describe this folder, so no leak is claimed either way
    assert metrics["test"]["note"].startswith("No near-duplicate audit describes this data folder")
    report = json.loads((out / "eval_test" / "metrics.json").read_text())
    assert np.asarray(report["confusion_matrix"]).sum() == report["n"] == N_TEST
    assert (out / "training_curves.png").stat().st_size > 10_000
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "not a diagnostic device" in card and "user-supplied data folder" in card
    assert f"| test split (not audited for near-duplicates of train) | {N_TEST} | {metrics['test']['accuracy']:.3f}" in card
    calibration = json.loads((out / "calibration.json").read_text())
    config = json.loads((out / "config.json").read_text())
    # the temperature lives in the head's weights, so every loader gets calibrated probabilities
    assert config["bonebreak_temperature"] == 1.0 and config["bonebreak_temperature_folded"] == calibration["temperature"] > 0
    assert metrics["calibration"]["temperature_folded_into_head"] is True
    assert (out / "xray_check.safetensors").is_file() and (out / "xray_check.onnx").is_file() and not (out / "ood.safetensors").exists()
    assert (out / "reliability_validation.png").is_file()
    assert Image.open(out / "eval_test" / "confusion_matrix.png").size[0] > 400
    classifier = pipeline("image-classification", model=str(out), top_k=3)
    image = next((out / "eval_test").glob("*.png"))  # any image works to prove the pipeline runs
    result = classifier(Image.open(image).convert("RGB"))
    assert len(result) == 3 and {r["label"] for r in result} <= set(metrics["labels"])
    return metrics


def test_tiny_vit_trains_one_epoch(trained_vit):
    check_run(trained_vit, expected_steps=math.ceil(N_TRAIN / 8))


def test_tiny_convnext_and_lite0_train_one_epoch(handful, tiny_convnext, tmp_path):
    main(["--data_dir", str(handful), "--model", str(tiny_convnext), "--epochs", "1", "--batch_size", "8",
          "--output_dir", str(tmp_path / "convnext"), "--num_workers", "0"])
    check_run(tmp_path / "convnext", expected_steps=3)
    main(["--data_dir", str(handful), "--model", "efficientnet_lite0", "--epochs", "1", "--batch_size", "10",
          "--image_size", "128", "--output_dir", str(tmp_path / "lite0"), "--num_workers", "1"])
    metrics = check_run(tmp_path / "lite0", expected_steps=2)
    assert json.loads((tmp_path / "lite0" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 128, 128]
    assert metrics["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")  # --precision auto on a CPU
    assert metrics["world_size"] == 1


def test_rerun_refuses_to_clobber_then_resumes(handful, tiny_vit, tmp_path):
    out = tmp_path / "vit"
    common = ["--data_dir", str(handful), "--model", str(tiny_vit), "--batch_size", "8", "--output_dir", str(out), "--num_workers", "0", "--no_evaluate_test"]
    main(common + ["--epochs", "1"])
    with pytest.raises(ValueError, match="is not empty.*--overwrite_output_dir.*--resume"):
        main(common + ["--epochs", "2"])
    metrics = main(common + ["--epochs", "2", "--resume"])
    assert metrics["global_step"] == 6 and metrics["epochs_run"] == 2
    history = json.loads((out / "log_history.json").read_text())
    evaluated = [e["epoch"] for e in history if "eval_loss" in e]
    assert evaluated.count(1.0) == 1 and 2.0 in evaluated  # epoch 1 kept from the first run, not redone


def test_accelerate_multi_process_is_data_parallel(handful, tiny_vit, tmp_path):
    """Two real processes over gloo: half the steps each, one coherent checkpoint written once."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
               str(REPO / "train.py"), "--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1",
               "--batch_size", "4", "--output_dir", str(out), "--num_workers", "0"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == math.ceil(N_TRAIN / (4 * 2))  # a single process would take 5 steps
    assert result.stdout.count("Serve it:   python app.py --model_path") == 1  # one process writes and reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp", "ddp.trainer"]
    from bonebreak.models.checkpoints import load_checkpoint
    model, _ = load_checkpoint(out)
    assert model.config.num_labels == 10


def test_grouped_cross_validation_reports_mean_and_spread(handful, tiny_vit, tmp_path):
    manifest = write_manifest(handful, tmp_path / "manifest.csv")
    out = tmp_path / "cv"
    result = main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8",
                   "--output_dir", str(out), "--num_workers", "0", "--cv_folds", "3", "--split_manifest", str(manifest)])
    saved = json.loads((out / "cv.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["folds"] == 3
    assert sum(f["n_validation"] for f in saved["per_fold"]) == 30  # every Train image held out exactly once
    assert saved["mean"]["macro_f1"] == pytest.approx(np.mean([f["macro_f1"] for f in saved["per_fold"]]))
    assert saved["std"]["accuracy"] >= 0 and not any(out.glob("fold*.trainer"))
    with pytest.raises(ValueError, match="--cv_folds needs the grouped split manifest"):
        main(["--data_dir", str(handful), "--model", str(tiny_vit), "--output_dir", str(tmp_path / "x"), "--cv_folds", "2"])
    check_cv_ensemble(out, saved, tmp_path)
    check_kept_out_of_fold(out, saved, handful, tmp_path)


def check_cv_ensemble(run: Path, saved: dict, tmp_path: Path) -> None:
    """``experiments --ensemble`` of CV runs scores the mean of the members' held-out probabilities fold by fold."""
    oracle = tmp_path / "oracle"  # a second member that puts probability 1 on every given label
    for fold in range(3):
        shutil.copytree(run / f"fold{fold}", oracle / f"fold{fold}", ignore=shutil.ignore_patterns("*.onnx"))
        table = oracle / f"fold{fold}" / "eval_validation" / "probabilities.csv"
        paths, given, probs, labels = read_probabilities(table)
        write_probabilities(table, paths, given, np.eye(len(labels))[[labels.index(g) for g in given]], labels)
    shutil.copy(run / "cv.json", oracle / "cv.json")
    results = tmp_path / "results"
    common = ["--results_dir", str(results), "--table_path", str(tmp_path / "table.md")]
    experiments.main(["--ensemble", str(run), str(run), "--name", "twins", *common])
    experiments.main(["--ensemble", str(run), str(oracle), "--name", "with_oracle", *common])
    records = {r["recipe"]: r for r in map(json.loads, map(Path.read_text, results.glob("*.json")))}
    twins, with_oracle = records["twins"], records["with_oracle"]
    assert twins["kind"] == "cv3" and twins["seed"] == saved["seed"]
    trained_in = json.loads((run / "fold0" / "metrics.json").read_text())["precision"]  # fp32, bf16 or fp16
    assert trained_in in ("fp32", "bf16", "fp16")
    assert twins["machine"]["precision"] == with_oracle["machine"]["precision"] == trained_in
    for mine, member in zip(twins["cv"]["per_fold"], saved["per_fold"]):  # two identical members score as one
        assert mine["fold"] == member["fold"] and mine["macro_f1"] == pytest.approx(member["macro_f1"])
    # mean with a one-hot on the given label: that label gets >= 0.5 and every other < 0.5, so every image is right
    assert [f["accuracy"] for f in with_oracle["cv"]["per_fold"]] == [1.0, 1.0, 1.0]
    assert with_oracle["latency_ms_per_image"]["ensemble"] > 0
    table = (tmp_path / "table.md").read_text()
    assert f"| with_oracle | 3 | {saved['seed']} |" in table
    other_seed = tmp_path / "other_seed"
    shutil.copytree(oracle, other_seed)
    (other_seed / "cv.json").write_text(json.dumps({**saved, "seed": saved["seed"] + 1}))
    with pytest.raises(ValueError, match="different --seed"):
        experiments.main(["--ensemble", str(run), str(other_seed), *common])
    with pytest.raises(ValueError, match="not a mix"):
        experiments.ExperimentArguments(ensemble=[str(run), str(run / "fold0")])


def check_kept_out_of_fold(run: Path, saved: dict, data_dir: Path, tmp_path: Path) -> None:
    """A CV record keeps its held-out probabilities beside it, so an --ensemble needs no work folder later."""
    kept_dir = tmp_path / "kept"
    record = {"recipe": "tiny", "kind": "cv3", "seed": saved["seed"], "started": "2026-11-27T10:00:00+0000", "machine": {"precision": "fp32"},
              "cv": {"mean": saved["mean"], "std": saved["std"], "per_fold": saved["per_fold"]}, "out_of_fold": saved["out_of_fold"]}
    path = experiment_runs.save_record(record, kept_dir, data_dir)
    kept = kept_dir / json.loads(path.read_text())["out_of_fold"]
    assert kept.name == path.name.replace(".json", ".oof.csv") and kept.is_file()
    paths, given, probs, labels = read_probabilities(kept)
    source_paths, source_given, source_probs, source_labels = read_probabilities(saved["out_of_fold"])
    assert not any(os.path.isabs(p) for p in paths)  # relative to the dataset: the same on every machine
    assert [os.path.abspath(data_dir / p) for p in paths] == [os.path.abspath(p) for p in source_paths]
    assert (given, labels) == (source_given, source_labels) and np.allclose(probs, source_probs)
    copy = shutil.copy(path, kept_dir / "copy.json")  # a second member (records name their kept file, so it is shared)
    results = tmp_path / "results_from_records"
    common = ["--results_dir", str(results), "--table_path", str(tmp_path / "table_from_records.md")]
    experiments.main(["--ensemble", str(path), str(copy), "--name", "twin_records", *common])
    [twins] = map(json.loads, map(Path.read_text, results.glob("*.json")))
    for mine, member in zip(twins["cv"]["per_fold"], saved["per_fold"], strict=True):  # the folds are cut as the run cut them
        assert mine["n_validation"] == member["n_validation"] and mine["macro_f1"] == pytest.approx(member["macro_f1"], abs=1e-4)
    assert twins["latency_ms_per_image"] is None  # no models in a record: not timed
    assert twins["machine"]["precision"] == "fp32"  # the members' precision: the ensemble pairs with the fp32 baseline
    bf16 = kept_dir / "bf16.json"
    bf16.write_text(json.dumps({**json.loads(path.read_text()), "machine": {"precision": "bf16"}}))
    experiments.main(["--ensemble", str(path), str(bf16), "--name", "mixed_records", *common])
    mixed = next(r for r in map(json.loads, map(Path.read_text, results.glob("*.json"))) if r["recipe"] == "mixed_records")
    assert mixed["machine"]["precision"] == "mixed"  # pairs with no baseline
    with pytest.raises(ValueError, match="not a mix"):
        experiments.ExperimentArguments(ensemble=[str(run), str(path)])
    old = kept_dir / "old.json"  # written before held-out probabilities were kept: names a work-folder file
    old.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pass the run's folder instead"):
        experiments.ExperimentArguments(ensemble=[str(path), str(old)])


def test_same_seed_gives_the_same_model(handful, tiny_vit, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, seed: str) -> dict:
        main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--seed", seed,
              "--output_dir", str(tmp_path / name), "--num_workers", "0", "--no_evaluate_test"])
        return load_file(str(tmp_path / name / "model.safetensors"))

    first, again, other = run("a", "3"), run("b", "3"), run("c", "4")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_model_card_can_add_cross_validation_without_re_evaluating(trained_vit, tmp_path):
    import shutil

    from bonebreak.commands import model_card

    folder = tmp_path / "ckpt"
    shutil.copytree(trained_vit, folder)
    cv = {"folds": 5, "per_fold": [{"n_validation": 6}] * 5, "mean": {"accuracy": 0.3, "macro_f1": 0.25, "top3_accuracy": 0.6},
          "std": {"accuracy": 0.05, "macro_f1": 0.04, "top3_accuracy": 0.02}}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    card = model_card.main(["--model_path", str(folder), "--reuse_reports", "--cv_report", str(tmp_path / "cv.json")]).read_text()
    assert "| grouped 5-fold CV over Train (mean +- std of folds) | 30 | 0.300 +- 0.050 | 0.250 +- 0.040 | 0.600 +- 0.020 |" in card
    assert "Grouped stratified 5-fold cross-validation of the same recipe" in card
    assert json.loads((folder / "metrics.json").read_text())["cv"] == cv


def test_reports_match_the_saved_model_after_bf16_training(handful, tiny_vit, tmp_path):
    """Evaluation after mixed-precision training must run the fp32 forward that users get."""
    import csv

    import numpy as np

    from bonebreak.models.torch_backend import load_classifier

    out = tmp_path / "bf16"
    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
          "--num_workers", "0", "--precision", "bf16", "--export_onnx", "false"])
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16"
    rows = list(csv.DictReader((out / "eval_validation" / "predictions.csv").open()))
    predictor = load_classifier(out, backend="torch", device="cpu")
    reloaded = predictor.probabilities([row["path"] for row in rows])
    assert [predictor.labels[i] for i in reloaded.argmax(1)] == [row["predicted"] for row in rows]
    assert np.abs(reloaded.max(1) - [float(row["probability"]) for row in rows]).max() <= 6e-5  # csv keeps 4 decimals


def test_every_transformers_flag_reaches_the_trainer(handful, tiny_vit, tmp_path):
    from bonebreak.models.factory import create_model

    out = tmp_path / "flags"
    flags = ["--data_dir", str(handful), "--model", str(tiny_vit), "--output_dir", str(out), "--num_workers", "0",
             "--gradient_accumulation_steps", "2", "--report_to", "none", "--torch_compile", "false",
             "--lr_scheduler_type", "linear", "--max_grad_norm", "0.5", "--adam_beta2", "0.99", "--epochs", "1", "--batch_size", "2"]
    model_args, data_args, args = parse_arguments(flags)
    data = prepare_data(data_args, args.seed)
    model, processor = create_model(model_args.model, data.labels)
    trainer = build_trainer(model_args, data_args, args, data, model, processor)
    carried = trainer.args
    assert (carried.gradient_accumulation_steps, carried.report_to, carried.torch_compile) == (2, [], False)
    assert (carried.lr_scheduler_type.value, carried.max_grad_norm, carried.adam_beta2) == ("linear", 0.5, 0.99)
    assert carried.output_dir == f"{out}.trainer" and args.output_dir == str(out)  # checkpoints beside the final model
    assert (carried.metric_for_best_model, carried.load_best_model_at_end, carried.per_device_eval_batch_size) == ("macro_f1", True, 2)

    # 20 training images in batches of 2 are 10 micro-batches: accumulating 2 of them halves the optimizer steps
    accumulated = main(flags + ["--no_evaluate_test", "--export_onnx", "false"])
    assert accumulated["global_step"] == 5 and accumulated["arguments"]["gradient_accumulation_steps"] == 2


def test_dicom_and_16bit_png_train_like_any_image(handful, tiny_vit, tmp_path):
    """Training decodes with the app's decoder: a DICOM and a 16-bit PNG are trained on, not crashed on or skipped."""
    from bonebreak.data.loading import DecodedImages, load_splits
    from bonebreak.data.preprocess import PreprocessConfig
    from bonebreak.training.augment import eval_transform

    data = tmp_path / "data"
    shutil.copytree(handful, data)
    make_dicom(data / "Spiral Fracture" / "Train" / "scan.dcm", gradient16(96, 80))
    Image.fromarray(gradient16(96, 80)).save(data / "Avulsion fracture" / "Train" / "film16.png")
    out = tmp_path / "run"
    main(["--data_dir", str(data), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
          "--num_workers", "0", "--no_evaluate_test", "--export_onnx", "false", "--cache_images", "false"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_files"] == []
    assert sum(metrics["counts"]["train"].values()) + sum(metrics["counts"]["validation"].values()) == N_TRAIN + N_VAL + 2

    splits = load_splits(data, split_manifest="none").splits
    paths = [p for s in ("train", "validation") for p in DecodedImages(splits[s], lambda image: image, cache=False).paths]
    assert sum(p.endswith((".dcm", ".png")) for p in paths) == 2
    transform = eval_transform(PreprocessConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    for name in ("train", "validation"):
        cached, streamed = DecodedImages(splits[name], transform), DecodedImages(splits[name], transform, cache=False)
        for i, path in enumerate(cached.paths):
            if path.endswith((".dcm", ".png")):
                assert torch.equal(cached[i]["pixel_values"], streamed[i]["pixel_values"])
                assert cached.images[i].mode == "RGB" and np.asarray(cached.images[i]).std() > 20  # windowed, not white
