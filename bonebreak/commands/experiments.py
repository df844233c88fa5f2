"""Reproducible accuracy experiments: ``bonebreak experiments --recipes baseline res320``.

Each named recipe is a JSON file in ``recipes/`` (``--recipes mixup`` reads ``recipes/mixup.json``), the
same file ``python train.py --recipe recipes/mixup.json`` takes: ``train.py`` settings on top of the
shipped recipe, parsed by the same parser. A run trains
on the grouped train split, selects the epoch on grouped validation, evaluates on validation,
clean Test (published Test minus images with a near-copy in Train) and published Test (leaks),
each with and without flip test-time augmentation, and appends one JSON record to
``benchmarks/results/``. ``--cv 5`` runs grouped 5-fold CV of the recipe instead; its held-out probabilities are
kept beside the record (``<record>.oof.csv``), since the work folder with the models is not committed.
``--ensemble DIR DIR ...`` evaluates the mean of several trained checkpoints (e.g. CV fold models) and
its latency cost; given CV run folders (``<work_dir>/<recipe>-cv5-seed42``) or CV records with their kept
``.oof.csv`` it scores the ensemble fold by fold instead, so the selection protocol can judge it against the baseline.
``bonebreak experiments --table`` regenerates ``docs/experiments.md`` and its forest plot.

Selection rule: the paired repeated-CV protocol of ``bonebreak/lab/protocol.py`` (docs/experiments.md); Test is
never used to pick.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import parse
from ..data.layouts import resolve_data_dir
from ..lab.runner import (
    RECIPES,
    is_cv_run,
    run_cv_ensemble,
    run_ensemble,
    run_recipe,
    save_record,
)
from ..lab.results_table import write_table

logger = logging.getLogger(__name__)


@dataclass
class ExperimentArguments:
    recipes: list[str] = field(default_factory=list, metadata={"help": f"Recipes to run, in order: {', '.join(RECIPES)}."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."})
    seed: list[int] = field(
        default_factory=lambda: [42],
        metadata={"help": "Seed(s): each recipe runs once per seed. With --cv the seed also draws the folds, so "
                  "`--cv 5 --seed 42 43` is the repeated grouped CV of docs/experiments.md. An --ensemble of "
                  "checkpoints trained with one seed (e.g. the fold models of a CV run) is recorded under theirs."},
    )
    cv: int = field(default=0, metadata={"help": "Grouped k-fold CV of each recipe instead of one train/validation run (e.g. 5)."})
    resume: bool = field(default=False, metadata={"help": "Continue interrupted runs in --work_dir (finished CV folds are kept) "
                                                  "instead of starting them over."})
    results_dir: str = field(default="benchmarks/results", metadata={"help": "Where the JSON records are appended."})
    work_dir: str = field(default="runs/experiments", metadata={"help": "Where run models go (large; not committed)."})
    table: bool = field(default=False, metadata={"help": "Only regenerate the markdown table from the records."})
    table_path: str = field(default="docs/experiments.md", metadata={"help": "Markdown table written after every run."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N shuffled images (smoke tests)."})
    epochs: float | None = field(default=None, metadata={"help": "Override every recipe's epochs (smoke tests)."})
    train_flags: str = field(
        default="",
        metadata={"help": "Extra train.py flags for every run, as one quoted string, e.g. --train_flags '--dataloader_num_workers 8' "
                  "on a many-core GPU machine. Recorded; they must not change the recipe under comparison."},
    )
    note: str | None = field(default=None, metadata={"help": "Free text stored in each record (e.g. how the data differ)."})
    ensemble: list[str] = field(
        default_factory=list,
        metadata={"help": "Instead of training, evaluate the mean of these checkpoints' probabilities on clean Test (e.g. "
                  "runs/cv5/fold*), or, given CV runs of one seed, score it fold by fold for the selection protocol (pass "
                  "the members' --note so it pairs with their baseline): their folders (e.g. runs/experiments/baseline-cv5-seed42 "
                  "runs/experiments/lite1-cv5-seed42) or their records in benchmarks/results/ (the held-out probabilities "
                  "are kept beside them; no models, so no latency)."},
    )
    name: str | None = field(
        default=None,
        metadata={"help": "Name of the --ensemble record (default: ensemble), or of the runs of the one recipe in --recipes "
                  "(default: the recipe's name), e.g. --recipes baseline --name baseline_rerun for a repeat that gets its "
                  "own row (the same recipe on the same folds: its gain is training noise alone) instead of superseding "
                  "the baseline every recipe is paired with."},
    )

    def __post_init__(self) -> None:
        unknown = [name for name in self.recipes if name not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipe(s) {', '.join(unknown)}; --recipes takes: {', '.join(RECIPES)}")
        if not self.recipes and not self.table and not self.ensemble:
            raise ValueError("name at least one recipe with --recipes, checkpoints with --ensemble, or pass --table")
        if self.name and self.recipes and self.ensemble:
            raise ValueError(f"--name {self.name} would name both the --recipes runs and the --ensemble record: run them "
                             "one at a time")
        if self.name and len(self.recipes) > 1:
            raise ValueError(f"--name {self.name} names the runs of one recipe, but --recipes has {len(self.recipes)}: "
                             "run them one at a time")
        if self.name in RECIPES and self.recipes and self.name not in self.recipes:
            raise ValueError(f"--name {self.name} is another recipe's name: its runs would be paired as that recipe; "
                             f"pick a new name (e.g. {self.recipes[0]}_rerun)")
        if len(self.ensemble) == 1:
            raise ValueError("--ensemble needs at least 2 checkpoint folders")
        check_ensemble_members(self.ensemble)
        if self.cv == 1 or self.cv < 0:
            raise ValueError(f"--cv must be 0 (off) or >= 2, got {self.cv}")


def check_ensemble_members(members: list[str]) -> None:
    """Checkpoint folders, or CV runs all given one way: run folders, or records with their kept probabilities."""
    cv_runs = [is_cv_run(member) for member in members]
    stray = [member for member, cv in zip(members, cv_runs) if Path(member).is_file() and not cv]
    if stray:
        raise ValueError(f"--ensemble {', '.join(stray)}: not a CV record with its held-out probabilities kept beside it "
                         "(<record>.oof.csv, written since they are kept); pass the run's folder instead")
    if any(cv_runs) and not all(cv_runs):
        raise ValueError("--ensemble takes either checkpoint folders or CV runs (folders with cv.json, or records with "
                         "their kept .oof.csv), not a mix: " + ", ".join(f for f, cv in zip(members, cv_runs) if not cv)
                         + " is not a CV run")
    folders = [Path(member).is_dir() for member in members]
    if all(cv_runs) and any(folders) and not all(folders):
        raise ValueError("--ensemble of CV runs: give all members as run folders or all as records, not a mix (a "
                         "record's image paths are relative to the dataset, a folder's as its run was given --data_dir)")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exp = parse(ExperimentArguments, argv, "bonebreak experiments", __doc__)
    for name in exp.recipes:
        for seed in exp.seed:
            logger.info("experiment %s (seed %d)", name, seed)
            path = save_record(run_recipe(name, exp, seed), exp.results_dir, resolve_data_dir(exp.data_dir))
            logger.info("record written to %s", path)
            write_table(exp)
    if exp.ensemble:
        path = save_record((run_cv_ensemble if is_cv_run(exp.ensemble[0]) else run_ensemble)(exp), exp.results_dir)
        logger.info("record written to %s", path)
        write_table(exp)
    if exp.table:
        print(write_table(exp).read_text())

