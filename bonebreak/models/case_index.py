"""Build a checkpoint's similar-cases index (``serving/similar_cases.py``) from the images it was trained on.

Run when a model is packaged at the end of training and by ``bonebreak export --similar_cases``. The features are
the checkpoint's own pooled features, computed by the engine that serves it (ONNX Runtime when the folder has an
up-to-date ``model.onnx``), so a request compares like with like. Marks: a case whose label the label audit
questions (``bonebreak label-issues``'s CSV: cleanlab flags and conflicting near-duplicate groups), and near-duplicate
groups from the split manifest (``bonebreak audit``).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from ..common.notices import DATASET_ATTRIBUTION
from ..data.loading import LoadedData, image_paths, label_index_map
from ..data.splits import read_manifest_groups
from ..serving.loader import load_predictor
from ..serving.onnx_runtime import served_weights_stamp
from ..serving.similar_cases import build_index
from .torch_backend import TorchForward

logger = logging.getLogger(__name__)

DEFAULT_LABEL_AUDIT = Path("reports/label_issues/label_issues.csv")


def questioned_labels(label_audit: str | os.PathLike | None, root: Path) -> set[Path]:
    """Images whose label the label audit questions (flagged by cleanlab, or in a near-duplicate group whose copies
    disagree); none when there is no audit file."""
    if label_audit is None or not Path(label_audit).is_file():
        return set()
    with open(label_audit, newline="") as handle:
        return {root / row["path"] for row in csv.DictReader(handle)
                if row.get("flagged_by_cleanlab") == "True" or row.get("conflicting_group") == "True"}


def own_data_credit(data: LoadedData) -> str:
    return f"Cases: training images from the folder '{data.root.name}', shown under the terms of their owner."


def write_case_index(checkpoint: str | os.PathLike, data: LoadedData, known_dataset: bool,
                     label_audit: str | os.PathLike | None = DEFAULT_LABEL_AUDIT) -> Path:
    """Index the training split of ``data`` into ``checkpoint``/similar_cases.safetensors; returns the file's path."""
    checkpoint = Path(checkpoint)
    predictor = load_predictor(checkpoint, "auto", TorchForward.from_checkpoint, xray_check=False, similar_cases=False)
    train = data.splits["train"]
    paths = [str(p) for p in image_paths(train)]
    to_model = label_index_map(data.labels, predictor.labels)  # the index speaks the model's label order
    groups_by_path = read_manifest_groups(data.manifest, data.root) if data.manifest else {}
    group_ids: dict[str, int] = {}
    groups = [group_ids.setdefault(groups_by_path[Path(p)], len(group_ids)) if Path(p) in groups_by_path else -1 for p in paths]
    questioned = questioned_labels(label_audit, data.root)
    stamp = served_weights_stamp(checkpoint, predictor.forward)
    index = build_index(predictor.embeddings, predictor.load, paths, [to_model[label] for label in train["label"]], predictor.labels,
                        DATASET_ATTRIBUTION if known_dataset else own_data_credit(data),
                        flagged=[Path(p) in questioned for p in paths], groups=groups, weights_stamp=stamp)
    path = index.save(checkpoint)
    logger.info("wrote %s: %d cases, %.1f MB (%d labels questioned, %d in near-duplicate groups)", path, len(paths),
                path.stat().st_size / 1e6, int(index.flagged.sum()), int(index.near_duplicate.sum()))
    return path
