"""The selection protocol: a recipe against the baseline on the same grouped CV folds, fold by fold.

Repeated grouped K-fold CV (``bonebreak experiments --recipes R --cv 5 --seed 42 43``) scores
every recipe on identical held-out folds (the seed draws the folds; near-duplicate groups never straddle
them; held-out images keep their original labels). Fold difficulty varies far more than recipes do, so
the comparison is paired: the gain is recipe minus baseline on the same (seed, fold), and its 95%
interval is a Student-t interval over those paired differences (with a percentile bootstrap beside it).
A recipe is adopted only when the whole interval lies above zero, over at least MIN_SEEDS seeds: one seed's
folds are one draw of the split, and on this dataset a second seed has reversed a gain that one seed's five
pairs put above zero (docs/experiments.md, exclude_cleanlab on the GPU). A pair is only ever formed between
runs trained in the same floating-point precision (``--precision auto`` picks bf16 on a CPU with native bf16 and
fp32 on one without, and that alone moved a fold by up to 0.03), so a seed run in fp32 pairs with the fp32
baseline of that seed, never with the bf16 one.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from scipy import stats

LEVEL = 0.95
MIN_SEEDS = 2  # the "repeated" in repeated grouped CV


def precision(record: dict[str, Any]) -> str:
    """The floating-point precision a CV record's models were trained in ("?" for records that do not say)."""
    return str(record.get("machine", {}).get("precision") or "?")


def fold_scores(records: Iterable[dict[str, Any]], metric: str) -> dict[tuple[int, int, str], float]:
    """(seed, fold, precision) -> the held-out fold's score, over CV records of one recipe (one record per seed and precision)."""
    scores: dict[tuple[int, int, str], float] = {}
    for record in records:
        for fold in record["cv"]["per_fold"]:
            key = (int(fold.get("seed", record["seed"])), int(fold["fold"]), precision(record))
            if key in scores:
                raise ValueError(f"recipe {record['recipe']}: (seed, fold, precision) {key} appears in two records; keep one run per seed")
            scores[key] = float(fold[metric])
    return scores


def t_interval(differences: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    n = len(differences)
    if n < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * differences.std(ddof=1) / np.sqrt(n)
    return (float(differences.mean() - half), float(differences.mean() + half))


def bootstrap_interval(differences: np.ndarray, level: float = LEVEL, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    if len(differences) < 2:
        return (float("nan"), float("nan"))
    draws = np.random.default_rng(seed).choice(differences, size=(resamples, len(differences)), replace=True).mean(axis=1)
    low, high = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
    return (float(low), float(high))


def verdict(seeds: int, t_low: float) -> str:
    """The "passes the rule" column in words: "yes", "no", or why the protocol cannot decide yet."""
    if seeds < MIN_SEEDS:
        return f"not decided: {seeds} seed{'s' if seeds != 1 else ''}, the protocol needs {MIN_SEEDS}"
    return "yes" if t_low > 0 else "no"


def paired_gain(baseline: Iterable[dict[str, Any]], candidate: Iterable[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Mean paired gain of ``candidate`` over ``baseline`` on their shared (seed, fold, precision) pairs, with intervals."""
    base, cand = fold_scores(baseline, metric), fold_scores(candidate, metric)
    shared = sorted(base.keys() & cand.keys())
    differences = np.array([cand[key] - base[key] for key in shared])
    t_low, t_high = t_interval(differences)
    seeds = sorted({seed for seed, _, _ in shared})
    decision = verdict(len(seeds), t_low)
    return {
        "metric": metric,
        "pairs": len(shared),
        "seeds": seeds,
        "precisions": {seed: sorted({p for s, _, p in shared if s == seed}) for seed in seeds},
        "baseline_mean": float(np.mean([base[k] for k in shared])) if shared else float("nan"),
        "candidate_mean": float(np.mean([cand[k] for k in shared])) if shared else float("nan"),
        "gain": float(differences.mean()) if shared else float("nan"),
        "t_interval": [t_low, t_high],
        "bootstrap_interval": list(bootstrap_interval(differences)),
        "differences": [round(float(d), 4) for d in differences],
        "adopt": decision == "yes",
        "verdict": decision,
    }
