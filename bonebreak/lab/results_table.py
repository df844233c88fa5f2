"""The results table of the experiments: records in, docs/experiments.md and its forest plot out.

Reads the JSON records the runner (``experiment_runs``) writes, renders single runs, ensembles, CV runs and the
selection protocol's paired gains (``protocol``), and draws those gains (``plots``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the runner writes the figure without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..evaluation.metrics import TOP_K  # noqa: E402
from .protocol import paired_gain, precision  # noqa: E402

ADOPT_MARGIN = 0.05  # validation macro-F1 a recipe must gain over the baseline to replace it (the earlier protocol)
METRICS = ("accuracy", "macro_f1", f"top{TOP_K}_accuracy")


def load_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]


def _cell(split: dict[str, Any] | None, metric: str, ci: bool = True) -> str:
    if not split:
        return "-"
    low, high = split["ci95"][metric]
    return f"{split[metric]:.3f} [{low:.2f}-{high:.2f}]" if ci else f"{split[metric]:.3f}"


PROTOCOL = """## How a recipe is judged: repeated grouped cross-validation, paired with the baseline

One validation split of 147 images cannot tell a real +0.03 macro-F1 from noise (its 95% interval is about
+-0.07 wide). So a recipe is now judged like this (`bonebreak/lab/protocol.py`):

1. `bonebreak experiments --recipes baseline RECIPE --cv 5 --seed 42 43`: grouped, stratified 5-fold CV
   over the Train folder (near-duplicate groups never straddle folds), once per seed; the seed draws the folds.
   Every recipe sees exactly the same folds, and each held-out fold is scored on all its images with their
   original labels (`--exclude_file` / `--relabel_file` change the training part of each fold only).
2. For each (seed, fold) the gain is recipe minus baseline on that fold; the table below gives the mean gain
   and its 95% Student-t interval over those pairs (a percentile bootstrap beside it). Pairing removes the
   fold-to-fold spread (fold macro-F1 varies by about +-0.03), which is far larger than the recipe effects.
3. A recipe is adopted only when the whole t interval of its macro-F1 gain lies above zero, over at least two
   seeds (one seed's five folds are one draw of the split; here a second seed has reversed a gain that the first
   seed's pairs alone put above zero). Only then is it trained on the full Train folder to be shipped.
   Passing is necessary, not sufficient: an ensemble also multiplies the inference cost, and a row built
   from the label files carries the optimism described below, so docs/experiments.md (notes) weighs those against the
   clean-Test check of their fold models, or of the models trained to ship, before anything is shipped.

Label errors (`bonebreak label-issues --cv_dir <the baseline's CV folder>`): cleanlab's confident
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
table like a recipe (run it once per seed under the same name). A CV run's held-out probabilities are also kept
beside its record (`benchmarks/results/<record>.oof.csv`, paths relative to the dataset), so the members can be
given as those records instead of work folders, on any machine, without the models (then no latency is measured;
the older records lack the file, and their work folders are gone). And `--ensemble <work_dir>/A-cv5-seed42/fold0 ...
fold4` scores a CV run's five fold models on clean Test, each and averaged (the ensembles table): a check on
images and labels that no label file touched, and so free of the optimism above.

A rerun of a recipe, seed and precision supersedes its older record in the paired table. To repeat the baseline
without moving the reference every recipe was judged against, record the repeat under its own name
(`--recipes baseline --name baseline_rerun`): it gets its own row, the same recipe on the same folds.

Precision is part of the pairing. `--precision auto` (the default) trains in bf16 on a CPU with native bf16
(AVX512-BF16 or AMX) and in fp32 on one without, and the machines these runs land on differ: the CPU records of
lite1 seed 43 and of a second baseline seed 43 were trained in fp32 while the first seed-43 baseline was bf16.
That baseline pair (same recipe, seed and folds, fp32 minus bf16) differed by -0.011 [-0.030, +0.009] macro-F1,
up to 0.033 on one fold, as much as most gains here. So a pair is formed only between runs trained in the same
precision (the precision is in each row of the tables): an fp32 seed pairs with that seed's fp32 baseline.
"""


def render_table(records: list[dict[str, Any]], table_path: str | os.PathLike = "docs/experiments.md") -> str:
    """Markdown: one row per run, split runs sorted by validation macro-F1 (the selection metric)."""
    split_runs = sorted((r for r in records if r["kind"] == "split"), key=lambda r: -r["validation"]["macro_f1"])
    lines = [
        "# Accuracy experiments",
        "",
        "Generated by `bonebreak experiments --table` from the records in `benchmarks/results/`; do not edit the table by hand (notes go at the end).",
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
            where = f"{r['machine'].get('gpu') or str(r['machine']['cpus']) + '-core CPU'}, {precision(r)}"
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {r['recipe']} | {r['kind'][2:]} | {r['seed']} | {cells} | {r['wall_seconds'] / 60:.0f} | {where}{note} | {r['commit']} |")
        lines += paired_table(cv_runs, protocol_figure_path(table_path).name)
    return "\n".join(lines) + "\n"


def latest_per_seed(cv_runs: list[dict[str, Any]]) -> dict[tuple[str, str | None, str], list[dict[str, Any]]]:
    """(CV kind, note, recipe) -> the newest record of each seed and precision. Runs are compared only within one
    kind and note (a note marks runs on other data or hardware, e.g. the GPU sweeps on a resized copy), and pairs
    only within one precision (``protocol``); a rerun of a recipe, seed and precision supersedes the older record,
    which stays in benchmarks/results/ (a repeat recorded with ``--name`` is another recipe here, so it supersedes
    nothing)."""
    newest: dict[tuple[str, str | None, str, int, str], dict[str, Any]] = {}
    for r in sorted(cv_runs, key=lambda r: r.get("started", "")):
        newest[(r["kind"], r.get("note"), r["recipe"], r["seed"], precision(r))] = r
    grouped: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for (kind, note, recipe, _, _), r in sorted(newest.items(), key=lambda item: str(item[0])):
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
             "Pairs use the newest record of each recipe, seed and precision, and only records with the same note (the note column: "
             "runs on other data or hardware are never paired with these) and the same training precision (seeds column: a seed "
             "trained in fp32 pairs with that seed's fp32 baseline).", "",
             "| recipe | CV | note | seeds | pairs | macro-F1 (recipe / baseline) | macro-F1 gain [t 95%] (bootstrap) | accuracy gain [t 95%] | "
             "top-3 gain [t 95%] | passes the rule |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gains = row["gains"]
        f1 = gains["macro_f1"]
        cell = {m: f"{g['gain']:+.3f} [{g['t_interval'][0]:+.3f}, {g['t_interval'][1]:+.3f}]" for m, g in gains.items()}
        boot = f1["bootstrap_interval"]
        lines.append(f"| {row['recipe']} | {row['kind'][2:]}-fold | {row['note'] or '-'} | {_seeds(f1)} | {f1['pairs']} | "
                     f"{f1['candidate_mean']:.3f} / {f1['baseline_mean']:.3f} | {cell['macro_f1']} ({boot[0]:+.3f}, {boot[1]:+.3f}) | "
                     f"{cell['accuracy']} | {cell[f'top{TOP_K}_accuracy']} | {f1['verdict']} |")
    if figure:
        lines += ["", f"![Paired macro-F1 gain of each recipe over the baseline: every (seed, fold) pair and the 95% t interval]({figure})"]
    return lines


def _seeds(gain: dict[str, Any]) -> str:
    """"42 (bf16), 43 (fp32)": each seed with the precision its pairs were trained in."""
    return ", ".join(f"{seed} ({'/'.join(gain['precisions'][seed])})" for seed in gain["seeds"])


def protocol_figure_path(table_path: str | os.PathLike) -> Path:
    """The forest plot that goes beside the table: docs/experiments.md -> docs/experiments_protocol.png."""
    table = Path(table_path)
    return table.with_name(f"{table.stem}_protocol.png")


NOTES_MARKER = "<!-- hand-written notes below: bonebreak experiments --table keeps them -->"


def write_table(exp: Any) -> Path:
    """docs/experiments.md and, when there are paired gains, its forest plot beside it; the hand-written notes after
    ``NOTES_MARKER`` (what each experiment found, in words) are kept."""
    path = Path(exp.table_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = load_records(exp.results_dir)
    notes = path.read_text().partition(NOTES_MARKER) if path.is_file() else ("", "", "")
    path.write_text(render_table(records, path) + (f"\n{NOTES_MARKER}{notes[2]}" if notes[1] else ""))
    rows = paired_gains([r for r in records if r["kind"].startswith("cv")])
    if rows:
        plot_paired_gains([{"label": f"{row['recipe']}, seed {', '.join(map(str, row['gains']['macro_f1']['seeds']))}"
                           + (f"\n{row['note']}" if row["note"] else ""), **row["gains"]["macro_f1"]} for row in rows],
                          protocol_figure_path(path), "Selection protocol: macro-F1 gain over the baseline, paired by seed and fold")
    return path



def plot_paired_gains(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Forest plot: per row (``label``, ``differences``, ``gain``, ``t_interval``, ``adopt``) every paired
    difference as a dot, the mean gain and its 95% interval as a bar; green only where the gain passes the protocol's rule."""
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(rows)))
    for y, row in enumerate(reversed(rows)):
        colour = "tab:green" if row["adopt"] else "tab:grey"
        low, high = row["t_interval"]
        if np.isfinite(low) and np.isfinite(high):
            ax.plot([low, high], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
        ax.plot([row["gain"]], [y], "D", color=colour, markersize=7)
        ax.scatter(row["differences"], np.full(len(row["differences"]), y + 0.22), s=12, color="black", alpha=0.6)
    ax.axvline(0.0, color="tab:red", linewidth=1)
    ax.set_yticks(range(len(rows)), [row["label"] for row in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.3)
    ax.set_xlabel("gain  (dots: one per seed and fold;  bar: mean and 95% t interval;  green: passes the rule)")
    fig.suptitle(title)  # over the whole figure: the long row labels push the axes right
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
