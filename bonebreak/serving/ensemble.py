"""An ensemble: several classifiers of the same labels answer as one, with the mean of their calibrated probabilities.

One class for every use: an ensemble checkpoint (a folder whose ``ensemble.json`` lists member models, served
by the app and every command), the lab's fold models of a cross-validation run, and distillation's teachers.
The first member is the one the heat map and the X-ray check come from (an ensemble checkpoint's own model).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..data.decode import ImageSource
from .predictor import Analysis, Prediction, Predictor


class Ensemble:
    """Members answer the same decoded image, each with its own preprocessing; the answer is their mean."""

    def __init__(self, members: Sequence[Predictor]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        first = self.members[0]
        if any(member.labels != first.labels for member in self.members):
            raise ValueError(f"ensemble members must share one label list: {[member.labels for member in self.members]}")
        self.labels, self.unsure_below, self.xray_check, self.similar_cases = first.labels, first.unsure_below, first.xray_check, first.similar_cases

    @property
    def description(self) -> str:
        return "; ".join(f"member {i}: {member.description}" for i, member in enumerate(self.members))

    @property
    def heatmaps_available(self) -> bool:
        return self.members[0].heatmaps_available

    def load(self, source: ImageSource) -> Image.Image:
        return self.members[0].load(source)

    def member_probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> list[np.ndarray]:
        """Each member's calibrated probabilities of the same images, each image decoded once."""
        decoded = [self.load(image) for image in images]
        return [member.probabilities(decoded, batch_size) for member in self.members]

    def probabilities(self, images: Sequence[ImageSource], batch_size: int = 16) -> np.ndarray:
        return np.mean(self.member_probabilities(images, batch_size), axis=0)

    def xray_distances(self, images: Sequence[ImageSource]) -> np.ndarray | None:
        return self.members[0].xray_distances(images)

    def predictions(self, images: Sequence[ImageSource], batch_size: int = 16) -> list[Prediction]:
        decoded = [self.load(image) for image in images]
        first = self.members[0].predictions(decoded, batch_size)  # the first member's X-ray check and embedding
        own = np.array([[one.probabilities[label] for label in self.labels] for one in first])
        probs = np.mean([own, *(member.probabilities(decoded, batch_size) for member in self.members[1:])], axis=0)
        return [self.members[0].to_prediction(p, one.xray_distance, one.embedding) for p, one in zip(probs, first)]

    def predict(self, source: ImageSource) -> Prediction:
        return self.predictions([source])[0]

    def analyse(self, source: ImageSource, heatmap: bool = True, label: str | None = None) -> Analysis:
        """The first member's analysis, its prediction the ensemble's and its heat map for the ensemble's answer."""
        image = self.load(source)
        others = [member.probabilities([image])[0] for member in self.members[1:]]
        return self.members[0].analyse(image, heatmap, label, others=others)
