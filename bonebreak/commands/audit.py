"""Find exact and near-duplicate images and build leak-free splits: ``bonebreak audit``.

Writes pairs.csv, groups.json, summary.json and contact_sheet.png (``--out_dir``) and the
grouped split manifest (``--manifest``). The work is in ``bonebreak.audit.duplicates`` (finding),
``bonebreak.data.splits`` (grouped splits) and ``bonebreak.audit.reports`` (the outputs).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from ..audit.duplicates import DEFAULT_COSINE_THRESHOLD, DEFAULT_HASH_THRESHOLD
from ..audit.reports import audit_dataset, format_summary
from ..common.argument_parser import parse
from ..data.splits import DEFAULT_MANIFEST, check_fraction


@dataclass
class AuditArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."}
    )
    out_dir: str = field(
        default="reports/audit",
        metadata={"help": "Where pairs.csv, groups.json, summary.json and contact_sheet.png are written."},
    )
    manifest: str = field(
        default=str(DEFAULT_MANIFEST),
        metadata={"help": "Split manifest CSV to write (path relative to the data root, label, split, group)."},
    )
    hash_threshold: int = field(
        default=DEFAULT_HASH_THRESHOLD,
        metadata={"help": "Pairs whose flip/rotation-invariant pHash distance (0-64 bits) is <= this are near-duplicates."},
    )
    cosine_threshold: float = field(
        default=DEFAULT_COSINE_THRESHOLD,
        metadata={"help": "Pairs whose EfficientNet-Lite0 embedding cosine is >= this are near-duplicates."},
    )
    embeddings: bool = field(
        default=True, metadata={"help": "Compute the embedding check (--embeddings false: hashes only, faster)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Images per embedding forward pass."})
    val_fraction: float = field(
        default=0.15, metadata={"help": "Share of the Train folder (whole groups, per class) held out for validation."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the grouped split; the manifest is identical for a given seed."})
    max_sheet_rows: int = field(
        default=40, metadata={"help": "Most groups drawn on contact_sheet.png (conflicts and leaks come first)."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.hash_threshold <= 64:
            raise ValueError(f"--hash_threshold must be between 0 and 64 bits, got {self.hash_threshold}")
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise ValueError(f"--cosine_threshold must be between -1 and 1, got {self.cosine_threshold}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        check_fraction(self.val_fraction)
        if self.max_sheet_rows < 0:
            raise ValueError(f"--max_sheet_rows must be >= 0, got {self.max_sheet_rows}")



def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(AuditArguments, argv, "bonebreak audit", __doc__)
    summary = audit_dataset(**asdict(args))
    print(format_summary(summary))
    print(f"\nReport written to {args.out_dir}, manifest to {args.manifest}")
    return summary

