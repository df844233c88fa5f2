"""``python -m bonebreak.export --model_path DIR``: (re)write a checkpoint's ``model.onnx``.

A thin front door: the export, its check against PyTorch and the weights stamp are
``bonebreak.onnx_backend.export_onnx``. ONNX is the only format, so there is no format flag.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

from .cli import parse
from .ensembles import ensemble_members
from .models import SHIPPED_MODEL, ModelLoadError
from .onnx_backend import DEFAULT_OPSET, DEFAULT_TOLERANCE, ONNX_FILE, export_onnx


@dataclass
class ExportArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to export."})
    output: str | None = field(default=None, metadata={"help": f"Where to write (default: MODEL_PATH/{ONNX_FILE}, which the app and CLI pick up, "
                                                                "and the same file in each ensemble member's folder)."})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset version."})
    tolerance: float = field(default=DEFAULT_TOLERANCE, metadata={"help": "Fail when a probability differs from PyTorch by more than this."})

    def __post_init__(self) -> None:
        if not 7 <= self.opset <= 23:
            raise ValueError(f"--opset must be between 7 and 23, got {self.opset}")
        if self.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(ExportArguments, argv)
    report = export_onnx(args.model_path, args.output, args.opset, args.tolerance)
    if args.output is None:  # an ensemble serves each member's own model.onnx
        members = {member.name: export_onnx(member, None, args.opset, args.tolerance) for member in ensemble_members(args.model_path)}
        report = {**report, **({"members": members} if members else {})}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ModelLoadError) as error:
        sys.exit(f"error: {error}")
