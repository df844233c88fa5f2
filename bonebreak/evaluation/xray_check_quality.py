"""How well the X-ray check tells X-rays from pictures that are not: AUROC and flag rates against the
natural photos shipped in ``assets/photos`` (no download, nothing beyond Pillow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

PHOTOS_DIR = Path(__file__).resolve().parent / "assets" / "photos"  # reference non-X-ray pictures (ATTRIBUTION.md)


def auroc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(score of an outlier > score of an X-ray), ties counted half."""
    from sklearn.metrics import roc_auc_score  # lazy: scikit-learn is heavy and only evaluation needs this

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return float(roc_auc_score(y, np.r_[positive_scores, negative_scores]))


def natural_photos(folder: Path = PHOTOS_DIR) -> list[tuple[str, Image.Image]]:
    """The shipped pictures that are not X-rays (name = file stem): public-domain/CC0 photos and a few generated ones."""
    photos = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with Image.open(path) as image:
            image.load()
            photos.append((path.stem, image))
    if not photos:
        raise FileNotFoundError(f"no reference photos in {folder}")
    return photos


def xray_check_quality(xray_distances: np.ndarray, photo_distances: np.ndarray, photo_names: Sequence[str],
                       threshold: float) -> dict[str, Any]:
    """The separation figures the model card and metrics.json report."""
    return {
        "auroc_photos_vs_xrays": auroc(photo_distances, xray_distances),
        "xrays_flagged": float(np.mean(xray_distances > threshold)),
        "photos_flagged": float(np.mean(photo_distances > threshold)),
        "n_xrays": len(xray_distances),
        "n_photos": len(photo_distances),
        "photos_missed": [name for name, d in zip(photo_names, photo_distances) if d <= threshold],
        "threshold": threshold,
    }
