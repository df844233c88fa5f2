"""After training: calibrate on validation, evaluate, write the model card and save the checkpoint.

One function, ``package_model``, turns a trained model into the folder users load: weights
(temperature folded into the head), the X-ray check, a report per split, training curves,
the model card and the ONNX copies serving runs. The checkpoint is written atomically
(``save_checkpoint``), so a crash leaves the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ..common.checkpoint_format import CALIBRATION_FILE, METRICS_FILE, XRAY_CHECK_FILE, XRAY_CHECK_ONNX
from ..data.loading import LoadedData, image_paths
from ..data.splits import Split
from ..evaluation.calibration import calibrate_model
from ..evaluation.card_refresh import refresh_card
from ..evaluation.model_card import known_dataset, render
from ..evaluation.plots import plot_training_curves
from ..evaluation.reports import comparison_table, evaluate_splits, record_results
from ..models.case_index import write_case_index
from ..models.checkpoints import save_checkpoint
from ..models.onnx_export import export_onnx

logger = logging.getLogger(__name__)

SCRATCH_FILES = ("training_curves.png", "reliability_validation.png", XRAY_CHECK_FILE, XRAY_CHECK_ONNX, CALIBRATION_FILE)


def similar_cases_wanted(choice: str, summary: dict[str, Any]) -> bool:
    """--similar_cases yes or no as asked; auto: only for the shipped bone-break data, whose license allows showing its pictures."""
    return known_dataset(summary) if choice == "auto" else choice == "yes"


def package_model(
    model: Any, processor: Any, data: LoadedData, summary: dict[str, Any], log_history: list[dict[str, Any]], output_dir: str | Path,
    evaluate_test: bool = True, onnx: bool = True, similar_cases: str = "auto",
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Calibrate, evaluate on validation (and test), plot, write the model card, save atomically.

    ``model`` must be the plain fp32 module (no mixed-precision wrapper): reports must come from
    the forward users get (measured: under bf16 autocast up to 3 of 108 clean-Test predictions
    came out differently). Returns the saved folder and the evaluation report of each split.
    """
    build_cases = similar_cases_wanted(similar_cases, summary)
    summary["similar_cases"] = build_cases  # the card says what the folder ships
    names = [str(Split.VALIDATION)] + ([str(s) for s in (Split.TEST, Split.CLEAN_TEST) if s in data.splits] if evaluate_test else [])
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        predictor, summary["calibration"] = calibrate_model(model, processor, image_paths(data.splits["train"]),
                                                            image_paths(data.splits["validation"]), data.splits["validation"]["label"], scratch)
        reports, xray_check = evaluate_splits(predictor, data.splits, data.labels, names, lambda name: scratch / f"eval_{name}")
        record_results(summary, reports, xray_check)
        plot_training_curves(log_history, scratch / "training_curves.png")
        extra = {
            METRICS_FILE: json.dumps(summary, indent=2),
            "log_history.json": json.dumps(log_history, indent=2),
            "README.md": render(summary, reports),
        }
        extra.update({name: (scratch / name).read_bytes() for name in SCRATCH_FILES})
        model.to("cpu")
        saved = save_checkpoint(model, processor, output_dir, extra_files=extra,
                                extra_dirs={f"eval_{name}": scratch / f"eval_{name}" for name in names})
    if onnx:
        try:
            export_onnx(saved)
        except Exception as error:  # the PyTorch checkpoint is complete and usable without it
            logger.warning("ONNX export failed, the app and CLI will run on PyTorch: %s", error)
    if build_cases:
        try:
            write_case_index(saved, data, known_dataset(summary))
        except ValueError as error:  # e.g. a network without pooled features: the model serves without similar cases
            logger.warning("no similar-cases index: %s", error)
            refresh_card(saved, reuse_reports=True)  # the card and metrics.json were written promising one
    return saved, reports


def final_message(saved: Path, reports: dict[str, dict], train_seconds: float) -> str:
    """What a person needs at the end of a run: the scores, where the files are, how to serve it."""
    lines = [f"Trained in {train_seconds / 60:.1f} min. Best model (chosen by validation macro-F1), 95% bootstrap intervals:", "",
             comparison_table(reports), ""]
    if "clean_test" in reports:
        lines.append("The published Test split of the bone-break dataset leaks near-duplicates of Train: read clean Test "
                     "where it is shown (see README 'Known leakage').")
    lines += [f"Model, reports and model card: {saved}/ (metrics.json, eval_*/, training_curves.png, README.md)",
              f"Serve it:   python app.py --model_path {saved}",
              f"Predict:    bonebreak predict --model_path {saved} PATH..."]
    return "\n".join(lines)
