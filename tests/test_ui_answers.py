"""The app's answers without a server: the text beside the labels, the fracture background, the output pictures.

Fast: a real ``RequestHandler`` on the shipped model's ONNX copy, and a real ``RequestHandler`` and ``Predictor``
around a fake numpy network and a fake X-ray check network (the real server and browser are tests/test_app.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bonebreak.common.checkpoint_format import LOGITS
from bonebreak.data.decode import load_image
from bonebreak.data.preprocess import PreprocessConfig
from bonebreak.serving.loader import load_classifier
from bonebreak.serving.checkpoint_info import read_checkpoint_info
from bonebreak.serving.predictor import Predictor
from bonebreak.serving.ui import NOT_XRAY, OutputImages, RequestHandler, describe, fracture_info
from bonebreak.serving.xray_check import XrayCheck
from conftest import REPO, SHIPPED_MODEL, synthetic_xray


def test_info_file_covers_every_label():
    labels = read_checkpoint_info(SHIPPED_MODEL).labels  # the ten types every shipped and trained model classifies
    assert len(labels) == 10
    info = fracture_info()
    for label in labels:
        assert {"what", "mechanism", "who", "where", "management"} <= set(info[label])
        assert "Source:" in describe(label)
        assert set(info[label]) <= {"what", "mechanism", "who", "where", "management", "confused_with"}


def test_confused_pairs_are_named_on_both_sides():
    info = {k: v for k, v in fracture_info().items() if not k.startswith("_")}
    confused = {label for label, fields in info.items() if "confused_with" in fields}
    assert confused == {"Spiral", "Oblique", "Longitudinal", "Greenstick"}  # the pairs reports/label_issues/ singles out
    for label in confused:
        partner = next(other for other in confused - {label} if other in info[label]["confused_with"])
        assert label in info[partner]["confused_with"] and "Often confused" in describe(label)
    assert "Often confused" not in describe("Avulsion")


def test_the_visitors_background_text_has_no_lab_words():
    """Visitors read plain words; the audit's method and counts are in docs/experiments.md."""
    lab_words = ("cross-validation", "fold", "seed", "reports/", "label audit", "Train images", "out-of-fold", "cleanlab")
    for label in (k for k in fracture_info() if not k.startswith("_")):
        text = describe(label)
        assert not [word for word in lab_words if word.lower() in text.lower()], f"{label}: {text}"


def test_output_images_are_content_named_and_written_whole(tmp_path):
    outputs = OutputImages(folder=tmp_path / "out")
    first = outputs.save(synthetic_xray(1))
    assert outputs.save(synthetic_xray(1)) == first and outputs.save(synthetic_xray(2)) != first
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".jpg", ".jpg"]  # no partial files left
    stale = Path(first)
    os.utime(stale, (0, 0))  # an hour-old copy of a picture that is produced again
    assert outputs.save(synthetic_xray(1)) == first and OutputImages(folder=tmp_path / "out").save(synthetic_xray(1)) == first
    assert stale.is_file()


def test_a_request_decodes_once_and_the_xray_check_is_ready_before_it(monkeypatch, tmp_path):
    import bonebreak.serving.predictor as predictor_module

    predictor = load_classifier(SHIPPED_MODEL, backend="onnx")  # ONNX Runtime alone, as a Space serves it
    assert predictor.xray_check.embedder is not None  # built at start-up, not by the first visitor
    assert predictor.shared_input  # the shipped model's input serves the X-ray check too (average-pooled to its size)
    decoded = []
    monkeypatch.setattr(predictor_module, "load_image", lambda *args: decoded.append(args) or load_image(*args))
    example = str(REPO / "examples" / "spiral_fracture.jpg")
    labels, _, shown, _ = RequestHandler(predictor, outputs=OutputImages(folder=tmp_path))(example, True)
    assert len(decoded) == 1 and len(labels) == 3 and Path(shown).is_file()
    analysis = predictor.analyse(example)
    assert analysis.prediction.xray_check_passed is True
    assert analysis.prediction.xray_distance == pytest.approx(float(predictor.xray_distances([example])[0]), abs=1e-5)


# --- "not an X-ray" -----------------------------------------------------------------------------------

LABELS = ["Spiral", "Oblique", "Hairline", "Avulsion"]
CONFIG = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class ScriptedForward:
    """A numpy 'network' giving every image the same probabilities."""

    description = "scripted numpy network"
    output_names = [LOGITS]

    def __init__(self, probabilities: list[float]) -> None:
        self.logits = np.log(np.asarray(probabilities, dtype=np.float32))

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {LOGITS: np.repeat(self.logits[None], len(pixels), axis=0)}


class ScriptedEmbedder:
    """The X-ray check's network, scripted: every image embeds as ``direction``."""

    preprocess = CONFIG  # as the classifier's: its pixels serve the check too

    def __init__(self, direction: list[float]) -> None:
        self.direction = np.asarray(direction, dtype=np.float32)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return np.repeat(self.direction[None], len(pixels), axis=0)

    def __call__(self, images, batch_size: int = 32, load=None) -> np.ndarray:
        return self.embed_pixels(np.zeros((len(images), 3, 1, 1), np.float32))


def handler(tmp_path: Path, probabilities: list[float], like_training_xrays: bool) -> RequestHandler:
    """A request handler whose image is (or is not) like the training X-rays: reference embeddings along x, the
    image's along x (distance 0) or along y (distance 1), threshold 0.5."""
    check = XrayCheck(reference=np.array([[1.0, 0.0]], np.float32), threshold=0.5, k=1,
                      embedder=ScriptedEmbedder([1.0, 0.0] if like_training_xrays else [0.0, 1.0]))
    predictor = Predictor(LABELS, CONFIG, ScriptedForward(probabilities), xray_check=check)
    return RequestHandler(predictor, outputs=OutputImages(folder=tmp_path / "out"))


CONFIDENT = [0.95, 0.03, 0.015, 0.005]
UNSURE = [0.40, 0.30, 0.20, 0.10]


def test_not_an_xray_gets_no_fracture_type_even_when_the_model_is_confident(tmp_path):
    upload = tmp_path / "upload.png"
    synthetic_xray(5, (120, 100)).save(upload)
    classify = handler(tmp_path, CONFIDENT, like_training_xrays=False)
    prediction = classify.predictor.predict(str(upload))
    assert prediction.top_label == "Spiral" and prediction.top_probability == pytest.approx(0.95) and not prediction.unsure
    assert prediction.xray_check_passed is False
    labels, text, shown, cases = classify(str(upload), True)
    assert text == NOT_XRAY, f"a confident answer to an image that fails the X-ray check: {text!r}"
    assert labels == {} and not any(label in text for label in LABELS) and Path(shown).is_file()

    # unsure and unlike an X-ray: the same answer
    labels, text, _, _ = handler(tmp_path, UNSURE, like_training_xrays=False)(str(upload), True)
    assert labels == {} and text == NOT_XRAY

    # the same confident model on an image like the training X-rays names its type
    labels, text, _, _ = handler(tmp_path, CONFIDENT, like_training_xrays=True)(str(upload), True)
    assert text.startswith("**Most likely type: Spiral** (95%)") and "Spiral fracture" in text and NOT_XRAY not in text
    assert list(labels) == ["Spiral", "Oblique", "Hairline"] and labels["Spiral"] == pytest.approx(0.95)


def test_the_upload_is_shown_as_the_model_reads_it(tmp_path):
    """A DICOM's 12-bit ramp appears windowed to the full grey range (not black, as a naive 8-bit view shows it), a
    big scan shrunk to the preview size, and a file that cannot be read shows nothing (the answer says why)."""
    from PIL import Image

    from conftest import gradient16, make_dicom

    classify = handler(tmp_path, CONFIDENT, like_training_xrays=True)
    shown = Image.open(classify.preview(str(make_dicom(tmp_path / "scan.dcm", gradient16(160, 200)))))
    grey = np.asarray(shown.convert("L"), dtype=float)
    assert shown.size == (200, 160) and grey[:, :10].mean() < 20 and grey[:, -10:].mean() > 235
    synthetic_xray(3, (3000, 1500)).save(tmp_path / "scan.png")
    assert Image.open(classify.preview(str(tmp_path / "scan.png"))).size == (768, 384)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert classify.preview(str(tmp_path / "broken.jpg")) is None and classify.preview(None) is None
