"""Write what serving runs on ONNX Runtime into a checkpoint: ``bonebreak export --model_path DIR``.

A thin front door: ``model.onnx`` (the classifier, checked against PyTorch and stamped with the weights' hash) and
``xray_check.onnx`` (the X-ray check's network) come from ``bonebreak.models.onnx_export``; a folder from before
0.6 has its ``ood.safetensors`` renamed to ``xray_check.safetensors``. ONNX is the only format, so there is no
format flag.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import parse
from ..common.checkpoint_format import METRICS_FILE, ONNX_FILE, SHIPPED_MODEL, SIMILAR_CASES_FILE, XRAY_CHECK_FILE
from ..data.layouts import resolve_data_dir
from ..data.loading import load_splits, load_splits_as_trained
from ..evaluation.card_refresh import refresh_card
from ..evaluation.model_card import known_dataset
from ..models.case_index import write_case_index
from ..models.onnx_export import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_onnx, export_xray_check
from ..serving.checkpoint_info import ensemble_members
from ..serving.xray_check import LEGACY_FILE, adopt_legacy_file


@dataclass
class ExportArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to export."})
    output: str | None = field(default=None, metadata={"help": f"Where to write the classifier (default: MODEL_PATH/{ONNX_FILE}, which the "
                                                                "app and CLI pick up, and the same file in each ensemble member's folder)."})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset version."})
    tolerance: float = field(default=DEFAULT_TOLERANCE, metadata={"help": "Fail when a probability differs from PyTorch by more than this."})
    similar_cases: bool = field(default=False, metadata={"help": f"Also (re)build {SIMILAR_CASES_FILE}, the similar cases shown beside each "
                                                                 "answer, from --data_dir's training split (it ships thumbnails of those images)."})
    data_dir: str | None = field(default=None, metadata={"help": "The data the model was trained on, for --similar_cases "
                                                                 "(default: $BONEBREAK_DATA, else data/bone-break)."})

    def __post_init__(self) -> None:
        if not 7 <= self.opset <= 23:
            raise ValueError(f"--opset must be between 7 and 23, got {self.opset}")
        if self.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(ExportArguments, argv, "bonebreak export", __doc__)
    report = export_onnx(args.model_path, args.output, args.opset, args.tolerance)
    if args.output is None:  # an ensemble serves each member's own model.onnx
        members = {member.name: export_onnx(member, None, args.opset, args.tolerance) for member in ensemble_members(args.model_path)}
        report = {**report, **({"members": members} if members else {})}
        if adopt_legacy_file(args.model_path):
            report["renamed"] = f"{LEGACY_FILE} -> {XRAY_CHECK_FILE}"
        if (Path(args.model_path) / XRAY_CHECK_FILE).is_file():
            report["xray_check"] = export_xray_check(args.model_path, args.opset, args.tolerance)
    if args.similar_cases:
        report["similar_cases"] = str(write_similar_cases(args.model_path, args.data_dir))
    print(json.dumps(report, indent=2))
    return report


def write_similar_cases(model_path: str, data_dir: str | None) -> Path:
    """The index from the data the checkpoint was trained on, split as its training split it (the checkpoint's recorded
    split arguments); credited as the shipped dataset only when the checkpoint says it trained on it."""
    metrics = Path(model_path) / METRICS_FILE
    summary = json.loads(metrics.read_text()) if metrics.is_file() else {}
    root = resolve_data_dir(data_dir)
    data = load_splits_as_trained(summary["arguments"], root) if summary else load_splits(root)
    path = write_case_index(model_path, data, known_dataset(summary) if summary else False)
    if summary:
        refresh_card(model_path, reuse_reports=True)  # the card lists the index it now ships
    return path
