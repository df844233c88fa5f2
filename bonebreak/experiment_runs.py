"""The experiment runner's library: run a recipe file or an ensemble, keep a JSON record, render the table.

``python -m bonebreak.experiments`` (the front door) parses its options and calls these. ``exp`` is
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

from .data import image_paths
from .evaluation import PROBABILITIES_FILE, evaluate_split, metrics_with_intervals, predict_dataset, read_probabilities, true_indices
from .inference import Ensemble, Predictor
from .metrics import TOP_K, classification_metrics, headline
from .plots import plot_paired_gains
from .protocol import paired_gain
from .splits import EVALUATION_SPLITS
from .arguments import RECIPES_DIR, DataArguments, arguments_record, parse_arguments, read_recipe
from .training import prepare_data, run_cv, run_training

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))  # recipes/<name>.json; baseline.json is the shipped recipe
ADOPT_MARGIN = 0.05  # validation macro-F1 a recipe must gain over the baseline to replace it
METRICS = ("accuracy", "macro_f1", f"top{TOP_K}_accuracy")
RUNNER_OUTPUTS = ("docs/experiments.md", "docs/experiments_protocol.png", "benchmarks/results")  # its default outputs



def recipe_arguments(name: str, exp: Any, seed: int) -> tuple:
    """``train.py --recipe recipes/<name>.json`` plus this runner's data, seed, output folder and overrides."""
    kind = f"cv{exp.cv}-" if exp.cv else ""
    argv = ["--recipe", str(RECIPES_DIR / f"{name}.json"), "--seed", str(seed),
            "--output_dir", str(Path(exp.work_dir) / f"{name}-{kind}seed{seed}"), "--resume" if exp.resume else "--overwrite_output_dir"]
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


def evaluate_run(output_dir: str, data: Any) -> dict[str, dict[str, Any]]:
    """Every split of a trained run: the reports training wrote, plus flip test-time augmentation."""
    result: dict[str, dict[str, Any]] = {}
    predictor = Predictor.from_checkpoint(output_dir, device="cpu", tta=True)
    for split in map(str, EVALUATION_SPLITS):
        report = Path(output_dir) / f"eval_{split}" / "metrics.json"
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


def run_ensemble(exp: Any) -> dict[str, Any]:
    """Evaluate an ensemble of trained checkpoints on clean Test and published Test, with its latency cost.

    Fold models of a CV run have each seen 4/5 of Train, validation included, so there is no
    held-out split left to select with: ensembles are reported, never chosen on Test.
    """
    data = prepare_data(DataArguments(data_dir=exp.data_dir), exp.seed[0])
    ensemble = Ensemble(exp.ensemble)
    record: dict[str, Any] = {"recipe": exp.name or "ensemble", "kind": "ensemble", "members": exp.ensemble, "seed": exp.seed[0],
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


def is_cv_run(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "cv.json").is_file()


def cv_ensemble_folds(folders: list[str]) -> tuple[int, int, list[dict[str, Any]]]:
    """Seed, fold count and per-fold scores of the mean of several CV runs' held-out probabilities."""
    runs = [json.loads((Path(folder) / "cv.json").read_text()) for folder in folders]
    draws = {(run["seed"], run["folds"]) for run in runs}
    if len(draws) != 1:
        raise ValueError(f"--ensemble of CV runs: the members were run with different --seed / --cv_folds {sorted(draws)}; "
                         "an ensemble is scored fold by fold, so every member needs the same folds")
    seed, folds = draws.pop()
    per_fold = []
    for fold in range(folds):
        tables = [read_probabilities(Path(folder) / f"fold{fold}" / "eval_validation" / PROBABILITIES_FILE) for folder in folders]
        paths, given, _, labels = tables[0]
        for folder, (other_paths, _, _, other_labels) in zip(folders[1:], tables[1:]):
            if other_paths != paths or other_labels != labels:
                raise ValueError(f"{folder} fold {fold}: its held-out images or label order differ from {folders[0]}'s; "
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
    fold-0 models.
    """
    started = time.perf_counter()
    seed, folds, per_fold = cv_ensemble_folds(exp.ensemble)
    keys = [k for k in per_fold[0] if k.endswith(("accuracy", "f1"))]
    ensemble = Ensemble([str(Path(folder) / "fold0") for folder in exp.ensemble])
    sample = read_probabilities(Path(exp.ensemble[0]) / "fold0" / "eval_validation" / PROBABILITIES_FILE)[0][:20]
    return {
        "recipe": exp.name or "ensemble", "kind": f"cv{folds}", "members": exp.ensemble, "seed": seed,
        "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": exp.note,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "gpu": None},
        "cv": {"mean": {k: float(np.mean([f[k] for f in per_fold])) for k in keys},
               "std": {k: float(np.std([f[k] for f in per_fold], ddof=1)) for k in keys}, "per_fold": per_fold},
        "latency_ms_per_image": {"ensemble": latency_ms(ensemble, sample), "one_member": latency_ms(ensemble.members[0], sample)},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


FP32_NOTE = "fp32"  # record["inference"]: the split metrics are the saved checkpoint's fp32 forward


def run_recipe(name: str, exp: Any, seed: int) -> dict[str, Any]:
    model_args, data_args, args = recipe_arguments(name, exp, seed)
    started = time.perf_counter()
    arguments = arguments_record(model_args, data_args, args)
    record: dict[str, Any] = {
        "recipe": name,
        "overrides": read_recipe(RECIPES_DIR / f"{name}.json"),
        "arguments": {k: v for k, v in arguments.items() if k not in ("data_dir", "output_dir", "overwrite_output_dir", "resume", "recipe")},
        "seed": seed,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
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


def save_record(record: dict[str, Any], results_dir: str | os.PathLike) -> Path:
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['started'][:19].replace(':', '')}-{record['recipe']}-{record['kind']}-seed{record['seed']}.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def load_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]


def _cell(split: dict[str, Any] | None, metric: str, ci: bool = True) -> str:
    if not split:
        return "-"
    low, high = split["ci95"][metric]
    return f"{split[metric]:.3f} [{low:.2f}-{high:.2f}]" if ci else f"{split[metric]:.3f}"


PROTOCOL = """## How a recipe is judged: repeated grouped cross-validation, paired with the baseline

One validation split of 147 images cannot tell a real +0.03 macro-F1 from noise (its 95% interval is about
+-0.07 wide). So a recipe is now judged like this (`bonebreak/protocol.py`):

1. `python -m bonebreak.experiments --recipes baseline RECIPE --cv 5 --seed 42 43`: grouped, stratified 5-fold CV
   over the Train folder (near-duplicate groups never straddle folds), once per seed; the seed draws the folds.
   Every recipe sees exactly the same folds, and each held-out fold is scored on all its images with their
   original labels (`--exclude_file` / `--relabel_file` change the training part of each fold only).
2. For each (seed, fold) the gain is recipe minus baseline on that fold; the table below gives the mean gain
   and its 95% Student-t interval over those pairs (a percentile bootstrap beside it). Pairing removes the
   fold-to-fold spread (fold macro-F1 varies by about +-0.03), which is far larger than the recipe effects.
3. A recipe is adopted only when the whole t interval of its macro-F1 gain lies above zero, over at least two
   seeds (one seed's five folds are one draw of the split; here a second seed has reversed a gain that the first
   seed's pairs alone put above zero). Only then is it trained on the full Train folder to be shipped.

Label errors (`python -m bonebreak.label_issues --cv_dir <the baseline's CV folder>`): cleanlab's confident
learning on the baseline CV's out-of-fold probabilities (every Train image scored by a fold model that saw
neither it nor its near-copies) plus the audit's near-duplicate groups whose copies carry different labels;
it writes `reports/label_issues/` (the CSV, `exclude_*.csv` and `relabel_cleanlab.csv` for `train.py`, a
contact sheet and a summary that also counts the clean-Test labels that look wrong). Two thresholds:
`exclude_cleanlab.csv` holds every cleanlab flag (with fold models about 40% accurate, close to half of Train),
`exclude_cleanlab_confident.csv` only the flags where the fold models give the other label at least 0.5
(`--min_probability`), and `relabel_cleanlab.csv` relabels only those. The flags depend on the baseline's fold
models, which saw the other folds' labels, so a recipe built from them is judged on the same folds it was
derived from: a mild optimism the paired table does not remove. The recipes `exclude_cleanlab`,
`exclude_cleanlab_confident`, `exclude_conflicting_groups` and `relabel_cleanlab` read those files.

Two more uses of the CV runs, no training needed: `--ensemble <work_dir>/A-cv5-seed42 <work_dir>/B-cv5-seed42 --name N`
scores the mean of the members' held-out probabilities fold by fold, so an ensemble gets a row in the paired
table like a recipe (run it once per seed under the same name); and `--ensemble <work_dir>/A-cv5-seed42/fold0 ...
fold4` scores a CV run's five fold models on clean Test, each and averaged (the ensembles table): a check on
images and labels that no label file touched, and so free of the optimism above.
"""


def render_table(records: list[dict[str, Any]], table_path: str | os.PathLike = "docs/experiments.md") -> str:
    """Markdown: one row per run, split runs sorted by validation macro-F1 (the selection metric)."""
    split_runs = sorted((r for r in records if r["kind"] == "split"), key=lambda r: -r["validation"]["macro_f1"])
    lines = [
        "# Accuracy experiments",
        "",
        "Generated by `python -m bonebreak.experiments --table` from the records in `benchmarks/results/`; do not edit by hand.",
        "Each recipe is a file `recipes/<name>.json` (run one alone with `python train.py --recipe recipes/<name>.json`); the",
        "options column lists what it changes from the shipped recipe, the defaults of `python train.py`.",
        "",
        PROTOCOL,
        "## Single train/validation runs (the earlier protocol)",
        "",
        "Every run trains on the grouped train split (near-duplicate groups never straddle splits) and picks its epoch on grouped",
        "validation. Rows are sorted by validation macro-F1, which chose recipes until the protocol above. clean Test (108 images) is",
        "the published Test minus the 32 images with a near-copy in Train; published Test itself leaks and is shown only for",
        "comparison with other work. Brackets are 95% bootstrap intervals: with 108-147 images, differences under about 0.05",
        "are within noise, and every row is a single seed.",
        "\"train min\" is wall-clock time on a shared 2-core machine, other jobs included: use `benchmarks/speed.py` for speed.",
        "All metrics are the saved checkpoint's fp32 forward. Rule: a recipe replaces the shipped one only if its validation",
        f"macro-F1 beats the baseline's by at least {ADOPT_MARGIN} (twice the 0.023 gap between two runs of the baseline recipe that",
        "differed only in floating-point precision, bf16 0.433 vs fp32 0.410).",
        "",
        "| recipe | options | val macro-F1 | val acc | clean-Test acc | clean-Test macro-F1 | clean-Test top-3 | "
        "+flip TTA clean acc / F1 | published Test acc (leaks) | epochs | train min | precision | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in split_runs:
        options = " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in r["overrides"].items())
        options = options or "(shipped recipe)"
        if r["seed"] != 42:
            options += f" --seed {r['seed']}"
        tta = r.get("clean_test_tta")
        tta_cell = f"{tta['accuracy']:.3f} / {tta['macro_f1']:.3f}" if tta else "-"
        lines.append(
            f"| {r['recipe']} | `{options}` | {_cell(r['validation'], 'macro_f1')} | {_cell(r['validation'], 'accuracy', False)} | "
            f"{_cell(r.get('clean_test'), 'accuracy')} | {_cell(r.get('clean_test'), 'macro_f1')} | "
            f"{_cell(r.get('clean_test'), f'top{TOP_K}_accuracy')} | "
            f"{tta_cell} | {_cell(r.get('test'), 'accuracy', False)} | "
            f"{r['epochs_run']:.0f} | {r['train_seconds'] / 60:.1f} | {r['machine']['precision']} | {r['commit']} |"
        )
    ensembles = [r for r in records if r["kind"] == "ensemble"]
    if ensembles:
        lines += ["", "## Ensembles (mean of the members' calibrated probabilities)", "",
                  "Reported, never selected: fold models have each seen 4/5 of Train, validation included, so no held-out split is",
                  "left to choose with. Latency is the median of single-image calls on this machine, decoding included.", "",
                  "| ensemble | members | clean-Test acc | clean-Test macro-F1 | clean-Test top-3 | members' clean-Test acc | "
                  "published Test acc (leaks) | ms/image (one member) | commit |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ensembles:
            members = ", ".join(f"{m['accuracy']:.3f}" for m in r.get("clean_test_single_members", []))
            latency = r["latency_ms_per_image"]
            lines.append(
                f"| {r['recipe']} | {len(r['members'])} | {_cell(r.get('clean_test'), 'accuracy')} | {_cell(r.get('clean_test'), 'macro_f1')} | "
                f"{_cell(r.get('clean_test'), f'top{TOP_K}_accuracy')} | {members} | {_cell(r.get('test'), 'accuracy', False)} | "
                f"{latency['ensemble']:.0f} ({latency['one_member']:.0f}) | {r['commit']} |"
            )
    cv_runs = [r for r in records if r["kind"].startswith("cv")]
    if cv_runs:
        lines += ["", "## Grouped cross-validation over Train, one row per seed (mean +- std over folds)", "",
                  "| recipe | folds | seed | accuracy | macro-F1 | top-3 | wall min | machine / note | commit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(cv_runs, key=lambda r: (r.get("note") or "", r["recipe"], r["seed"], r.get("started", ""))):
            mean, std = r["cv"]["mean"], r["cv"]["std"]
            cells = " | ".join(f"{mean[m]:.3f} +- {std[m]:.3f}" for m in METRICS)
            where = r["machine"].get("gpu") or f"{r['machine']['cpus']}-core CPU"
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {r['recipe']} | {r['kind'][2:]} | {r['seed']} | {cells} | {r['wall_seconds'] / 60:.0f} | {where}{note} | {r['commit']} |")
        lines += paired_table(cv_runs, protocol_figure_path(table_path).name)
    return "\n".join(lines) + "\n"


def latest_per_seed(cv_runs: list[dict[str, Any]]) -> dict[tuple[str, str | None, str], list[dict[str, Any]]]:
    """(CV kind, note, recipe) -> the newest record of each seed. Runs are compared only within one kind and note
    (a note marks runs on other data or hardware, e.g. the GPU sweeps on a resized copy), and a rerun of a recipe
    and seed supersedes the older record, which stays in benchmarks/results/."""
    newest: dict[tuple[str, str | None, str, int], dict[str, Any]] = {}
    for r in sorted(cv_runs, key=lambda r: r.get("started", "")):
        newest[(r["kind"], r.get("note"), r["recipe"], r["seed"])] = r
    grouped: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for (kind, note, recipe, _), r in sorted(newest.items(), key=lambda item: str(item[0])):
        grouped.setdefault((kind, note, recipe), []).append(r)
    return grouped


def paired_gains(cv_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The selection protocol (bonebreak/protocol.py) for every recipe with CV runs: its paired gains over the baseline
    of the same CV kind and note, per metric, in table order."""
    by_recipe = latest_per_seed(cv_runs)
    rows = []
    for (kind, note, recipe), records in sorted(by_recipe.items(), key=lambda item: (item[0][0], item[0][1] or "", item[0][2])):
        baseline = by_recipe.get((kind, note, "baseline"))
        if recipe == "baseline" or not baseline:
            continue
        gains = {m: paired_gain(baseline, records, m) for m in METRICS}
        if gains["macro_f1"]["pairs"]:
            rows.append({"recipe": recipe, "kind": kind, "note": note, "gains": gains})
    return rows


def paired_table(cv_runs: list[dict[str, Any]], figure: str | None = None) -> list[str]:
    """The paired gains as markdown, with the forest plot ``figure`` (a path relative to the table) when given."""
    rows = paired_gains(cv_runs)
    if not rows:
        return []
    lines = ["", "## Selection protocol: paired gain over the baseline on the same CV folds and seeds", "",
             "Gain = recipe minus baseline on each (seed, fold), averaged; brackets are the 95% Student-t interval over those "
             "pairs (percentile bootstrap after it). Adopt only when the whole t interval of the macro-F1 gain is above zero, "
             "over at least two seeds (fewer: not decided).",
             "Pairs use the newest record of each recipe and seed, and only records with the same note (the note column: runs on "
             "other data or hardware are never paired with these).", "",
             "| recipe | CV | note | seeds | pairs | macro-F1 (recipe / baseline) | macro-F1 gain [t 95%] (bootstrap) | accuracy gain [t 95%] | "
             "top-3 gain [t 95%] | adopt |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gains = row["gains"]
        f1 = gains["macro_f1"]
        cell = {m: f"{g['gain']:+.3f} [{g['t_interval'][0]:+.3f}, {g['t_interval'][1]:+.3f}]" for m, g in gains.items()}
        boot = f1["bootstrap_interval"]
        lines.append(f"| {row['recipe']} | {row['kind'][2:]}-fold | {row['note'] or '-'} | {', '.join(map(str, f1['seeds']))} | {f1['pairs']} | "
                     f"{f1['candidate_mean']:.3f} / {f1['baseline_mean']:.3f} | {cell['macro_f1']} ({boot[0]:+.3f}, {boot[1]:+.3f}) | "
                     f"{cell['accuracy']} | {cell[f'top{TOP_K}_accuracy']} | {f1['verdict']} |")
    if figure:
        lines += ["", f"![Paired macro-F1 gain of each recipe over the baseline: every (seed, fold) pair and the 95% t interval]({figure})"]
    return lines


def protocol_figure_path(table_path: str | os.PathLike) -> Path:
    """The forest plot that goes beside the table: docs/experiments.md -> docs/experiments_protocol.png."""
    table = Path(table_path)
    return table.with_name(f"{table.stem}_protocol.png")


def write_table(exp: Any) -> Path:
    """docs/experiments.md and, when there are paired gains, its forest plot beside it."""
    path = Path(exp.table_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = load_records(exp.results_dir)
    path.write_text(render_table(records, path))
    rows = paired_gains([r for r in records if r["kind"].startswith("cv")])
    if rows:
        plot_paired_gains([{"label": f"{row['recipe']}, seed {', '.join(map(str, row['gains']['macro_f1']['seeds']))}"
                           + (f"\n{row['note']}" if row["note"] else ""), **row["gains"]["macro_f1"]} for row in rows],
                          protocol_figure_path(path), "Selection protocol: macro-F1 gain over the baseline, paired by seed and fold")
    return path
