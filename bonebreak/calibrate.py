"""``python -m bonebreak.calibrate --model_path DIR [--data_dir DATA]``: recalibrate a saved checkpoint.

Refits the temperature and the X-ray check on the checkpoint's own validation split (the
split settings are read from its ``metrics.json``), folds the temperature into the head,
saves the weights and, when the checkpoint has one, re-exports ``model.onnx``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .calibration import calibrate_predictor, fold_temperature
from .cli import parse
from .data import image_paths, load_splits, resolve_data_dir
from .inference import Predictor
from .models import SHIPPED_MODEL
from .onnx_backend import ONNX_FILE, export_onnx


@dataclass
class CalibrateArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to calibrate in place (its own model; ensemble members keep the temperature they were trained with)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (default: $BONEBREAK_DATA, else data/bone-break)."})


def calibrate_checkpoint(folder: str | Path, train_images: Sequence[str], val_images: Sequence[str], val_labels: Sequence[int]) -> dict[str, Any]:
    """Calibrate a saved checkpoint in place (config, ood file, calibration report)."""
    folder = Path(folder)
    raw = Predictor.from_checkpoint(folder, calibrated=False)
    result = calibrate_predictor(raw, train_images, val_images, val_labels, folder)
    result["temperature_folded_into_head"] = fold_temperature(raw.model, result["temperature"])
    raw.model.to("cpu").save_pretrained(folder, safe_serialization=True)
    if (folder / ONNX_FILE).is_file():  # the weights changed: keep the ONNX copy current
        export_onnx(folder)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(CalibrateArguments, argv)
    summary = json.loads((Path(args.model_path) / "metrics.json").read_text())["arguments"]
    data = load_splits(resolve_data_dir(args.data_dir), val_fraction=summary["val_fraction"], seed=summary["seed"],
                       split_manifest=summary.get("split_manifest", "none"))
    result = calibrate_checkpoint(args.model_path, image_paths(data.splits["train"]), image_paths(data.splits["validation"]),
                                  data.splits["validation"]["label"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
