"""The experiment runner's library: run a recipe file or an ensemble and keep its JSON record.

``bonebreak experiments`` (the front door) parses its options and calls these. ``exp`` is
its ``ExperimentArguments``: data folder, seed, work and results folders, smoke-test overrides.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.checkpoint_format import LOGITS, METRICS_FILE
from ..data.loading import image_paths
from ..data.splits import EVALUATION_SPLITS, relative_path
from ..evaluation.metrics import classification_metrics, headline
from ..evaluation.reports import (PROBABILITIES_FILE, evaluate_split, metrics_with_intervals, predict_dataset, read_probabilities,
                                  true_indices, write_probabilities)
from ..models.torch_backend import load_classifier, load_ensemble
from ..serving.predictor import Forward
from ..training.arguments import RECIPES_DIR, DataArguments, arguments_record, parse_arguments, read_recipe
from ..training.cross_validation import fold_spread, run_cv
from ..training.setup import for_this_machine, precision_of
from ..training.trainer import prepare_data, run_training
from .protocol import precision
from .results_table import METRICS

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))  # recipes/<name>.json; baseline.json is the shipped recipe
OOF_SUFFIX = ".oof.csv"  # <record>.oof.csv: a CV run's held-out probabilities, kept beside its JSON record
RUNNER_OUTPUTS = ("docs/experiments.md", "docs/experiments_protocol.png", "benchmarks/results")  # its default outputs



def run_name(name: str, exp: Any) -> str:
    """What a recipe's runs are called in their work folder and record: ``--name`` if given (a repeat), else the recipe."""
    return exp.name or name


def recipe_arguments(name: str, exp: Any, seed: int) -> tuple:
    """``train.py --recipe recipes/<name>.json`` plus this runner's data, seed, output folder and overrides."""
    kind = f"cv{exp.cv}-" if exp.cv else ""
    argv = ["--recipe", str(RECIPES_DIR / f"{name}.json"), "--seed", str(seed),
            "--output_dir", str(Path(exp.work_dir) / f"{run_name(name, exp)}-{kind}seed{seed}"), "--resume" if exp.resume else "--overwrite_output_dir"]
    if exp.data_dir:
        argv += ["--data_dir", exp.data_dir]
    if exp.max_train_samples:
        argv += ["--max_train_samples", str(exp.max_train_samples)]
    if exp.epochs is not None:
        argv += ["--num_train_epochs", str(exp.epochs)]
    if exp.cv:
        argv += ["--cv_folds", str(exp.cv)]
    return parse_arguments(argv + shlex.split(exp.train_flags))


def git_commit(root: Path = ROOT) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # The runner's own outputs (the table it regenerates, records written into a checkout) do not make a run's code dirty.
    own_outputs = [f":(exclude){path}" for path in RUNNER_OUTPUTS]
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", *own_outputs) else "")


def scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics of one split with their 95% bootstrap intervals."""
    return {"n": metrics["n"], **{m: metrics[m] for m in METRICS}, "ci95": {m: metrics["ci95"][m] for m in METRICS}}


class FlipAveraged:
    """Test-time augmentation for the lab: a network's logits averaged with those of the mirror image."""

    def __init__(self, forward: Forward) -> None:
        self.forward, self.description = forward, f"{forward.description}, averaged with the mirror image"

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        logits = (self.forward(pixels)[LOGITS] + self.forward(np.ascontiguousarray(pixels[..., ::-1]))[LOGITS]) / 2
        return {LOGITS: logits}


def evaluate_run(output_dir: str, data: Any) -> dict[str, dict[str, Any]]:
    """Every split of a trained run: the reports training wrote, plus flip test-time augmentation."""
    result: dict[str, dict[str, Any]] = {}
    predictor = load_classifier(output_dir, backend="torch", device="cpu")
    predictor.forward = FlipAveraged(predictor.forward)
    for split in map(str, EVALUATION_SPLITS):
        report = Path(output_dir) / f"eval_{split}" / METRICS_FILE
        if split in data.splits and report.is_file():
            result[split] = scores(json.loads(report.read_text()))
            metrics, _, _ = evaluate_split(predictor, data.splits[split], data.labels)
            result[f"{split}_tta"] = scores(metrics)
    return result


def latency_ms(predictor: Any, images: list[str]) -> float:
    """Median seconds per single-image ``probabilities`` call, in ms (decode included)."""
    predictor.probabilities(images[:1])
    seconds = []
    for image in images:
        started = time.perf_counter()
        predictor.probabilities([image])
        seconds.append(time.perf_counter() - started)
    return round(float(np.median(seconds)) * 1e3, 1)


def members_seed(folders: list[str], default: int) -> int:
    """The training seed the checkpoints share (the fold models of one CV run do), else ``default``.

    An ensemble's record is filed under this seed so that seed-43 fold models are not listed as seed 42;
    it only draws the validation images the latency is timed on, clean Test and Test do not depend on it.
    """
    seeds = set()
    for folder in folders:
        summary = Path(folder) / METRICS_FILE
        seeds.add(json.loads(summary.read_text()).get("arguments", {}).get("seed") if summary.is_file() else None)
    return seeds.pop() if len(seeds) == 1 and None not in seeds else default


def run_ensemble(exp: Any) -> dict[str, Any]:
    """Evaluate an ensemble of trained checkpoints on clean Test and published Test, with its latency cost.

    Fold models of a CV run have each seen 4/5 of Train, validation included, so there is no
    held-out split left to select with: ensembles are reported, never chosen on Test.
    """
    seed = members_seed(exp.ensemble, default=exp.seed[0])
    data = prepare_data(DataArguments(data_dir=exp.data_dir), seed)
    ensemble = load_ensemble(exp.ensemble, device="cpu")
    record: dict[str, Any] = {"recipe": exp.name or "ensemble", "kind": "ensemble", "members": exp.ensemble, "seed": seed,
                              "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    started = time.perf_counter()
    for split in ("clean_test", "test"):
        if split in data.splits:
            dataset = data.splits[split]
            truth = true_indices(dataset, data.labels, ensemble.labels)
            members = [predict_dataset(member, dataset) for member in ensemble.members]  # each member predicts once
            record[split] = scores(metrics_with_intervals(truth, np.mean(members, axis=0), ensemble.labels))
            record[f"{split}_single_members"] = [scores(metrics_with_intervals(truth, probs, ensemble.labels)) for probs in members]
    sample = image_paths(data.splits["validation"])[:20]
    record["latency_ms_per_image"] = {"ensemble": latency_ms(ensemble, sample), "one_member": latency_ms(ensemble.members[0], sample)}
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def kept_out_of_fold(record_file: str | os.PathLike) -> Path | None:
    """The held-out probabilities kept beside a CV record (``<record>.oof.csv``), if it has them.

    Records written before they were kept name a file in their run's work folder instead: not kept.
    """
    record_file = Path(record_file)
    if record_file.suffix != ".json" or not record_file.is_file():
        return None
    return kept_file(json.loads(record_file.read_text()), record_file)


def kept_file(record: dict[str, Any], record_file: Path) -> Path | None:
    kept = record_file.parent / str(record.get("out_of_fold") or "")
    return kept if str(record.get("kind", "")).startswith("cv") and kept.name.endswith(OOF_SUFFIX) and kept.is_file() else None


def is_cv_run(member: str | os.PathLike) -> bool:
    """A CV run folder (with ``cv.json``) or a CV record whose held-out probabilities were kept beside it."""
    return (Path(member) / "cv.json").is_file() or kept_out_of_fold(member) is not None


def run_precision(summary: dict[str, Any]) -> str:
    """A training run's precision from its metrics.json (runs before 0.6 recorded mixed_precision "no" for fp32)."""
    if "precision" in summary:
        return str(summary["precision"])
    mixed = summary.get("mixed_precision")
    return "fp32" if mixed == "no" else str(mixed or "?")


FoldTable = tuple[list[str], list[str], np.ndarray, list[str]]  # read_probabilities: paths, given labels, probabilities, classes


def cv_member_folds(member: str | os.PathLike) -> tuple[int, int, list[FoldTable]]:
    """Seed, fold count and each held-out fold's probabilities of one CV run, from its folder or its record."""
    member = Path(member)
    if member.is_dir():
        run = json.loads((member / "cv.json").read_text())
        folds = [read_probabilities(member / f"fold{fold}" / "eval_validation" / PROBABILITIES_FILE) for fold in range(run["folds"])]
        return run["seed"], run["folds"], folds
    record = json.loads(member.read_text())
    kept = kept_file(record, member)
    if kept is None:
        raise ValueError(f"{member}: no held-out probabilities kept beside it ({member.stem}{OOF_SUFFIX}); pass the run's folder instead")
    paths, given, probs, labels = read_probabilities(kept)
    sizes = [fold["n_validation"] for fold in record["cv"]["per_fold"]]
    if sum(sizes) != len(paths):
        raise ValueError(f"{member}: its kept held-out probabilities have {len(paths)} rows, its folds {sum(sizes)} images")
    bounds = np.cumsum([0, *sizes])  # the kept file lists fold 0's images, then fold 1's, ... (merge_out_of_fold)
    return record["seed"], len(sizes), [(paths[a:b], given[a:b], probs[a:b], labels) for a, b in zip(bounds[:-1], bounds[1:])]


def member_precision(member: str | os.PathLike) -> str:
    """The training precision (bf16, fp16, fp32) of a CV run, from its folder or its record ("?": not recorded)."""
    member = Path(member)
    if member.is_dir():
        return run_precision(json.loads((member / "fold0" / METRICS_FILE).read_text()))
    return precision(json.loads(member.read_text()))


def cv_ensemble_folds(members: list[str]) -> tuple[int, int, list[dict[str, Any]]]:
    """Seed, fold count and per-fold scores of the mean of several CV runs' held-out probabilities."""
    runs = [cv_member_folds(member) for member in members]
    draws = {(seed, folds) for seed, folds, _ in runs}
    if len(draws) != 1:
        raise ValueError(f"--ensemble of CV runs: the members were run with different --seed / --cv_folds {sorted(draws)}; "
                         "an ensemble is scored fold by fold, so every member needs the same folds")
    seed, folds = draws.pop()
    per_fold = []
    for fold in range(folds):
        tables = [fold_tables[fold] for _, _, fold_tables in runs]
        paths, given, _, labels = tables[0]
        for folder, (other_paths, _, _, other_labels) in zip(members[1:], tables[1:]):
            if other_paths != paths or other_labels != labels:
                raise ValueError(f"{folder} fold {fold}: its held-out images or label order differ from {members[0]}'s; "
                                 "the members must be CV runs over the same data with the same --seed")
        truth = np.array([labels.index(label) for label in given])
        probs = np.mean([probabilities for _, _, probabilities, _ in tables], axis=0)
        per_fold.append({"seed": seed, "fold": fold, "n_validation": len(paths), **headline(classification_metrics(truth, probs, labels))})
    return seed, folds, per_fold


def run_cv_ensemble(exp: Any) -> dict[str, Any]:
    """An ensemble judged by the selection protocol: fold by fold, the mean of its members' held-out probabilities.

    The members are CV runs with the same seed and folds (e.g. ``--cv 5 --seed 42`` of baseline and lite1), so
    every held-out fold is scored by models none of which saw it, and the record pairs with the baseline's folds
    like a recipe's does. Its cost is the members' inference together: the latency is measured on the members'
    fold-0 models when the members are run folders; members given as records (their models are not kept) leave
    it unmeasured.
    """
    started = time.perf_counter()
    seed, folds, per_fold = cv_ensemble_folds(exp.ensemble)
    latency = None
    if all(Path(member).is_dir() for member in exp.ensemble):
        ensemble = load_ensemble([str(Path(folder) / "fold0") for folder in exp.ensemble], device="cpu")
        sample = read_probabilities(Path(exp.ensemble[0]) / "fold0" / "eval_validation" / PROBABILITIES_FILE)[0][:20]
        latency = {"ensemble": latency_ms(ensemble, sample), "one_member": latency_ms(ensemble.members[0], sample)}
    precisions = {member_precision(member) for member in exp.ensemble}  # pairs only with a baseline trained alike
    return {
        "recipe": exp.name or "ensemble", "kind": f"cv{folds}", "members": exp.ensemble, "seed": seed,
        "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": exp.note,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "gpu": None,
                    "precision": precisions.pop() if len(precisions) == 1 else "mixed"},
        "cv": {**fold_spread(per_fold), "per_fold": per_fold},
        "latency_ms_per_image": latency,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


FP32_NOTE = "fp32"  # record["inference"]: the split metrics are the saved checkpoint's fp32 forward


def run_recipe(name: str, exp: Any, seed: int) -> dict[str, Any]:
    model_args, data_args, args = recipe_arguments(name, exp, seed)
    started = time.perf_counter()
    arguments = arguments_record(model_args, data_args, args)
    record: dict[str, Any] = {
        "recipe": run_name(name, exp),
        **({"trains_recipe": name} if run_name(name, exp) != name else {}),  # a renamed repeat: which recipe it trained
        "overrides": read_recipe(RECIPES_DIR / f"{name}.json"),
        "arguments": {k: v for k, v in arguments.items() if k not in ("data_dir", "output_dir", "overwrite_output_dir", "resume", "recipe")},
        "seed": seed,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "precision": precision_of(for_this_machine(args)),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "train_flags": exp.train_flags,
        "note": exp.note,
    }
    if exp.cv:
        cv = run_cv(model_args, data_args, args)
        record.update(kind=f"cv{exp.cv}", cv={"mean": cv["mean"], "std": cv["std"], "per_fold": cv["per_fold"]},
                      out_of_fold=cv["out_of_fold"])
    else:
        data = prepare_data(data_args, args.seed)
        summary = run_training(model_args, data_args, args, data)
        record.update(kind="split", epochs_run=summary["epochs_run"], best_checkpoint=summary["best_checkpoint"],
                      train_seconds=summary["train_seconds"], n_train=len(data.splits["train"]),
                      training_edits=data.training_edits,
                      inference=FP32_NOTE, **evaluate_run(args.output_dir, data))
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def keep_out_of_fold(source: str | os.PathLike, kept: Path, data_dir: str | os.PathLike | None) -> Path:
    """Copy a CV run's held-out probabilities, image paths relative to the dataset folder so they hold on any machine."""
    paths, given, probs, labels = read_probabilities(source)
    if data_dir is not None:
        root = Path(os.path.abspath(data_dir))
        paths = [relative_path(Path(os.path.abspath(p)), root) for p in paths]
    return write_probabilities(kept, paths, given, probs, labels)


def save_record(record: dict[str, Any], results_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Write the JSON record; a CV run's held-out probabilities are kept beside it (``<record>.oof.csv``).

    The work folder with the models is not committed, so without that copy a later ``--ensemble`` of this run with
    another (the protocol's way to judge an ensemble) would need the run trained again.
    """
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['started'][:19].replace(':', '')}-{record['recipe']}-{record['kind']}-seed{record['seed']}.json"
    source = record.get("out_of_fold")
    if source and Path(source).is_file():
        kept = keep_out_of_fold(source, path.with_suffix(OOF_SUFFIX), data_dir)
        record = {**record, "out_of_fold": kept.name}
    path.write_text(json.dumps(record, indent=2))
    return path
