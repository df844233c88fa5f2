"""Recalibrate a saved checkpoint in place: ``bonebreak calibrate --model_path DIR [--data_dir DATA]``.

Refits the temperature and the X-ray check on the checkpoint's own validation split (the split settings
are read from its ``metrics.json``), folds the temperature into the head, saves the weights and, when
the checkpoint has one, re-exports ``model.onnx``. The work is ``bonebreak.evaluation.calibration``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.argument_parser import parse
from ..common.checkpoint_format import METRICS_FILE, ONNX_FILE, SHIPPED_MODEL
from ..data.layouts import resolve_data_dir
from ..data.loading import image_paths, load_splits_as_trained
from ..evaluation.calibration import calibrate_model
from ..models.checkpoints import load_checkpoint
from ..models.onnx_export import export_onnx


@dataclass
class CalibrateArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to calibrate in place (its own model; ensemble members keep the temperature they were trained with)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(CalibrateArguments, argv, "bonebreak calibrate", __doc__)
    folder = Path(args.model_path)
    data = load_splits_as_trained(json.loads((folder / METRICS_FILE).read_text())["arguments"], resolve_data_dir(args.data_dir))
    model, processor = load_checkpoint(folder)
    _, result = calibrate_model(model, processor, image_paths(data.splits["train"]), image_paths(data.splits["validation"]),
                                data.splits["validation"]["label"], folder)
    model.to("cpu").save_pretrained(folder, safe_serialization=True)
    if (folder / ONNX_FILE).is_file():  # the weights changed: keep the ONNX copy current
        export_onnx(folder)
    print(json.dumps(result, indent=2))
    return result
