"""After training: calibrate on validation, evaluate, write the model card and save the checkpoint.

One function, ``package_model``, turns a trained model into the folder users load: weights
(temperature folded into the head), the X-ray check, a report per split, training curves,
the model card and an ONNX copy. The checkpoint is written atomically (``save_checkpoint``), so
a crash leaves the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from .calibration import calibrate_predictor, fold_temperature
from .card import render
from .data import LoadedData, image_paths, load_splits, resolve_data_dir
from .evaluation import comparison_table, evaluate_splits, record_results
from .inference import Predictor
from .ensembles import ensemble_members
from .models import save_checkpoint
from .ood import OOD_FILE, OODDetector
from .onnx_backend import export_onnx
from .plots import plot_training_curves
from .splits import EVALUATION_SPLITS, Split
from .transforms import preprocess_config_from_processor

logger = logging.getLogger(__name__)


def calibrate(model: Any, processor: Any, data: LoadedData, out_dir: Path) -> tuple[Predictor, dict]:
    """Fit temperature and the X-ray check on validation; returns the calibrated predictor.

    The temperature is folded into the classifier head, so ``pipeline()`` and
    ``AutoModelForImageClassification`` users get the same calibrated probabilities as the app.
    """
    raw = Predictor(model, preprocess_config_from_processor(processor, model.config))
    result = calibrate_predictor(raw, image_paths(data.splits["train"]), image_paths(data.splits["validation"]),
                                 data.splits["validation"]["label"], out_dir)
    result["temperature_folded_into_head"] = fold_temperature(model, result["temperature"])
    raw.temperature = float(model.config.bonebreak_temperature)
    raw.ood = OODDetector.load(out_dir)
    return raw, result


def package_model(
    model: Any, processor: Any, data: LoadedData, summary: dict[str, Any], log_history: list[dict[str, Any]], output_dir: str | Path,
    evaluate_test: bool = True, onnx: bool = True,
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Calibrate, evaluate on validation (and test), plot, write the model card, save atomically.

    ``model`` must be the plain fp32 module (no mixed-precision wrapper): reports must come from
    the forward users get (measured: under bf16 autocast up to 3 of 108 clean-Test predictions
    came out differently). Returns the saved folder and the evaluation report of each split.
    """
    names = [str(Split.VALIDATION)] + ([str(s) for s in (Split.TEST, Split.CLEAN_TEST) if s in data.splits] if evaluate_test else [])
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        predictor, summary["calibration"] = calibrate(model, processor, data, scratch)
        reports, ood = evaluate_splits(predictor, data.splits, data.labels, names, lambda name: scratch / f"eval_{name}")
        record_results(summary, reports, ood)
        plot_training_curves(log_history, scratch / "training_curves.png")
        extra = {
            "metrics.json": json.dumps(summary, indent=2),
            "log_history.json": json.dumps(log_history, indent=2),
            "README.md": render(summary, reports),
        }
        extra.update({name: (scratch / name).read_bytes() for name in ("training_curves.png", "reliability_validation.png", OOD_FILE, "calibration.json")})
        model.to("cpu")
        saved = save_checkpoint(model, processor, output_dir, extra_files=extra,
                                extra_dirs={f"eval_{name}": scratch / f"eval_{name}" for name in names})
    if onnx:
        try:
            export_onnx(saved)
        except Exception as error:  # the PyTorch checkpoint is complete and usable without it
            logger.warning("ONNX export failed, the app and CLI will run on PyTorch: %s", error)
    return saved, reports


def evaluate_checkpoint(folder: Path, summary: dict[str, Any], data_dir: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Evaluate a saved checkpoint (with its ensemble partners) on the splits it was trained with, into its eval_<split>/ folders."""
    arguments = summary["arguments"]
    data = load_splits(resolve_data_dir(data_dir), val_fraction=arguments["val_fraction"], seed=arguments["seed"],
                       split_manifest=arguments.get("split_manifest", "none"))
    names = [str(name) for name in EVALUATION_SPLITS if name in data.splits]
    return evaluate_splits(Predictor.from_checkpoint(folder), data.splits, data.labels, names, lambda name: folder / f"eval_{name}")


def ensemble_summary(folder: Path) -> dict[str, Any] | None:
    """What the card says of a checkpoint's partner models: each one's recipe and its own scores (None: a single model)."""
    members = []
    for member in ensemble_members(folder):
        own = json.loads((member / "metrics.json").read_text()) if (member / "metrics.json").is_file() else {}
        members.append({"path": member.relative_to(folder).as_posix(), "model": own.get("model", member.name),
                        **{key: own[key] for key in ("arguments", "mixed_precision", "train_seconds", "validation", "clean_test", "test") if key in own}})
    return {"combine": "mean of the members' calibrated probabilities", "members": members} if members else None


def refresh_card(folder: str | Path, data_dir: str | None = None, reuse_reports: bool = False, cv_report: str | None = None) -> Path:
    """Re-evaluate a saved checkpoint (or reuse its eval_*/ reports) and rewrite its metrics.json and model card."""
    folder = Path(folder)
    summary = json.loads((folder / "metrics.json").read_text())
    if reuse_reports:
        reports = {str(name): json.loads((folder / f"eval_{name}" / "metrics.json").read_text())
                   for name in EVALUATION_SPLITS if (folder / f"eval_{name}" / "metrics.json").is_file()}
        ood = None  # keep the recorded X-ray check
    else:
        reports, ood = evaluate_checkpoint(folder, summary, data_dir)
    record_results(summary, reports, ood)
    if (folder / "calibration.json").is_file():
        summary["calibration"] = json.loads((folder / "calibration.json").read_text())
    if cv_report:
        summary["cv"] = json.loads(Path(cv_report).read_text())
    summary.pop("ensemble", None)
    if (ensemble := ensemble_summary(folder)) is not None:
        summary["ensemble"] = ensemble
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2))
    card = folder / "README.md"
    card.write_text(render(summary, reports))
    return card


def final_message(saved: Path, reports: dict[str, dict], train_seconds: float) -> str:
    """What a person needs at the end of a run: the scores, where the files are, how to serve it."""
    lines = [f"Trained in {train_seconds / 60:.1f} min. Best model (chosen by validation macro-F1), 95% bootstrap intervals:", "",
             comparison_table(reports), ""]
    if "clean_test" in reports:
        lines.append("The published Test split of the bone-break dataset leaks near-duplicates of Train: read clean Test "
                     "where it is shown (see README 'Known leakage').")
    lines += [f"Model, reports and model card: {saved}/ (metrics.json, eval_*/, training_curves.png, README.md)",
              f"Serve it:   python app.py --model_path {saved}",
              f"Predict:    python -m bonebreak.predict --model_path {saved} PATH..."]
    return "\n".join(lines)
