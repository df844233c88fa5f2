"""Find likely label errors: ``bonebreak label-issues --cv_dir runs/experiments/baseline-cv5-seed42``.

Reads the out-of-fold probabilities of one or more grouped-CV runs (``bonebreak experiments
--recipes baseline --cv 5 --seed 42 43``, or ``bonebreak train --cv_folds 5``), ranks likely label
errors with cleanlab's confident learning, adds the near-duplicate groups whose copies disagree, and
writes ``reports/label_issues/``: label_issues.csv, exclude_cleanlab.csv (every cleanlab flag),
exclude_cleanlab_confident.csv (the strict threshold, --min_probability), exclude_conflicting_groups.csv,
relabel_cleanlab.csv (strict flags only; inputs of ``train.py --exclude_file / --relabel_file``), contact_sheet.png and
summary.md/json, including how many clean-Test labels look wrong. See docs/experiments.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..common.argument_parser import parse
from ..data.layouts import resolve_data_dir
from ..data.loading import load_splits
from ..lab.label_issues import MIN_PROBABILITY, format_summary, write_label_issues


@dataclass
class LabelIssueArguments:
    cv_dir: list[str] = field(
        default_factory=list,
        metadata={"help": "Output folder(s) of grouped-CV runs, each holding oof_probabilities.csv and fold*/ models; "
                  "several runs (e.g. two CV seeds) are averaged per image."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "The dataset the CV ran on (default: $BONEBREAK_DATA, else data/bone-break)."})
    split_manifest: str = field(default="auto", metadata={"help": "Grouped split manifest (as in train.py): defines clean Test and the groups."})
    test_split: str = field(default="auto", metadata={"help": "Test split to check too: 'auto' (clean_test when defined), a split name, or 'none'."})
    out_dir: str = field(default="reports/label_issues", metadata={"help": "Where the reports go."})
    min_probability: float = field(
        default=MIN_PROBABILITY,
        metadata={"help": "Strict threshold: exclude_cleanlab_confident.csv and relabel_cleanlab.csv keep only flagged images whose "
                  "suggested label gets at least this out-of-fold probability (exclude_cleanlab.csv keeps every cleanlab flag)."},
    )

    def __post_init__(self) -> None:
        if not self.cv_dir:
            raise ValueError("--cv_dir is required: the output folder of a grouped-CV run (`bonebreak experiments "
                             "--recipes baseline --cv 5`), which holds oof_probabilities.csv")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(LabelIssueArguments, argv, "bonebreak label-issues", __doc__)
    data = load_splits(resolve_data_dir(args.data_dir), split_manifest=args.split_manifest)
    test_split = None if args.test_split == "none" else args.test_split
    summary = write_label_issues(data, args.cv_dir, args.out_dir, test_split, args.min_probability)
    print(format_summary(summary, summary.get("test_split")), end="")
    print(f"Reports: {args.out_dir}/ (label_issues.csv, exclude_*.csv, relabel_cleanlab.csv, contact_sheet.png, summary.md)")
    return summary

