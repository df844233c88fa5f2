"""Check a dataset folder before training: ``bonebreak check-data [--data_dir PATH]``.

Prints the folder, the layout found, the classes, images per split and class (as train.py,
evaluate and audit will split them), the unreadable files with reasons, and whether the
shipped near-duplicate-grouped split manifest describes this folder (then clean_test exists).
Everything is done by ``bonebreak.data.loading.load_splits``; this module only prints what it found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..common.argument_parser import parse
from ..data.layouts import LAYOUTS, resolve_data_dir, scan_folder
from ..data.loading import LoadedData, load_splits
from ..data.splits import DEFAULT_MANIFEST, SPLITS, split_counts

@dataclass
class CheckArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Dataset folder to check (default: $BONEBREAK_DATA, else data/bone-break)."}
    )


def format_counts(data: LoadedData) -> str:
    splits = [s for s in SPLITS if s in data.counts]
    width = max(len("class"), *(len(label) for label in data.labels))
    rows = [["class", *splits]]
    rows += [[label, *(str(data.counts[s].get(label, 0)) for s in splits)] for label in data.labels]
    rows += [["total", *(str(sum(data.counts[s].values())) for s in splits)]]
    lines = ["  ".join([row[0].ljust(width), *(cell.rjust(max(len(s), 5)) for cell, s in zip(row[1:], splits))]) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> LoadedData:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")  # everything is printed below
    args = parse(CheckArguments, argv, "bonebreak check-data", __doc__)
    root = resolve_data_dir(args.data_dir)
    data = load_splits(root, check_images=True, split_manifest="auto")
    in_folder = split_counts(scan_folder(root))  # the folder's own splits, before any re-splitting
    print(f"Data folder: {root.absolute()}")
    print(f"Layout: {data.layout} ({LAYOUTS[data.layout]})")
    print(f"Classes ({len(data.labels)}): {', '.join(data.labels)}")
    manifest = DEFAULT_MANIFEST.relative_to(DEFAULT_MANIFEST.parent.parent).as_posix()
    if data.grouped:
        print(f"Split manifest: {manifest} matches this folder: validation is drawn from train in whole "
              "near-duplicate groups, and clean_test holds the test images with no near-copy in train.")
    else:
        source = "the folder's own validation split" if "validation" in in_folder else "carved out of train (stratified, 15%, seed 42)"
        print(f"Split manifest: {manifest} does not describe this folder, so there is no clean_test; validation: {source}.")
    print()
    print(format_counts(data))
    if "clean_test" in data.counts:
        print("(clean_test is the part of test with no near-copy in train)")
    readable = sum(sum(c.values()) for s, c in data.counts.items() if s != "clean_test")
    print(f"\n{readable} readable images, {len(data.broken)} unreadable{':' if data.broken else '.'}")
    for path, reason in data.broken:  # the reason names the file too: keep only what went wrong
        print(f"  {path.relative_to(root) if path.is_relative_to(root) else path}: {reason.removeprefix(f'{path}: ')}")
    if data.broken:
        print("Unreadable files are skipped by training and evaluation.")
    return data

