"""Turn the app's feedback folder into training images, reviewed by a person first.

Step 1, ``bonebreak feedback --feedback_dir DIR --output_dir OUT``: writes OUT/review.csv (one row per flag, with an
empty ``accept`` column) and OUT/contact_sheet.jpg (each flagged image captioned with the model's answer and the
visitor's verdict). Write yes or no in each row's ``accept`` (decisions already made are kept when step 1 runs again).
Step 2, the same command with ``--apply``: copies the accepted flags into OUT/extra_train/<label>/ (a wrong answer
under the visitor's type, a right one under the answer; "not an X-ray" flags never), for
``bonebreak train --extra_train_dir OUT/extra_train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import parse
from ..data.contact_sheets import SheetLayout, Thumbnail, draw_contact_sheet, grid
from ..serving.feedback import EXTRA_TRAIN, REVIEW_FILE, WRONG, apply_review, write_review


@dataclass
class FeedbackArguments:
    feedback_dir: str | None = field(default=None, metadata={"help": "The folder `bonebreak app --feedback_dir` wrote (required)."})
    output_dir: str = field(default="reports/feedback", metadata={"help": "Where review.csv, contact_sheet.jpg and extra_train/ go."})
    apply: bool = field(default=False, metadata={"help": "Step 2: copy the flags accepted in review.csv into extra_train/<label>/."})

    def __post_init__(self) -> None:
        if not self.feedback_dir:
            raise ValueError("--feedback_dir is required: the folder `bonebreak app --feedback_dir DIR` stored flags in")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(FeedbackArguments, argv, "bonebreak feedback", __doc__)
    out = Path(args.output_dir)
    if args.apply:
        counts = apply_review(args.feedback_dir, out)
        print(f"{sum(counts.values())} accepted images in {out / EXTRA_TRAIN}/ ({', '.join(f'{k}: {v}' for k, v in counts.items()) or 'none'}); "
              f"train with: bonebreak train --extra_train_dir {out / EXTRA_TRAIN}")
        return counts
    rows = write_review(args.feedback_dir, out)
    thumbnails = [Thumbnail(Path(args.feedback_dir) / row["image"],
                            [f"model: {row['predicted']} {float(row['probability'] or 0):.0%}",
                             f"visitor: {row['visitor_type'] if row['verdict'] == WRONG else row['verdict']}",
                             row["time_utc"]], highlight=1 if row["verdict"] == WRONG else None) for row in rows]
    draw_contact_sheet(grid(thumbnails, 6), out / "contact_sheet.jpg", SheetLayout(thumb=168))
    print(f"{len(rows)} flags: review {out / REVIEW_FILE} (write yes or no in its accept column; contact sheet: "
          f"{out / 'contact_sheet.jpg'}), then run the same command with --apply")
    return {"flags": len(rows)}
