"""Similar cases: the nearest labelled training X-rays in the classifier's own features, their marks, the k-NN vote,
the index file (round trip, stale refusal), the shipped index, and when training writes one (fast)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonebreak.common.checkpoint_format import SIMILAR_CASES_FILE
from bonebreak.common.notices import DATASET_ATTRIBUTION
from bonebreak.serving.loader import load_predictor
from bonebreak.serving.similar_cases import CaseIndex, build_index, thumbnail_jpeg
from bonebreak.serving.ui import RequestHandler, OutputImages
from bonebreak.training.finalize import similar_cases_wanted
from conftest import REPO, SHIPPED_MODEL, synthetic_xray

LABELS = ["Oblique", "Spiral", "Greenstick"]


def index_of(features, targets, flagged=None, groups=None) -> CaseIndex:
    n = len(features)
    return CaseIndex(np.asarray(features, np.float32), np.asarray(targets), LABELS, [f"case{i}.jpg" for i in range(n)],
                     [thumbnail_jpeg(synthetic_xray(i, (40, 30))) for i in range(n)],
                     np.asarray(flagged or [False] * n), np.asarray(groups or [-1] * n), "credit line")


def test_nearest_cases_come_by_cosine_similarity_with_their_marks():
    index = index_of([[1, 0], [0, 1], [1, 1], [-1, 0]], [0, 1, 2, 0], flagged=[False, True, False, False], groups=[5, 7, 5, -1])
    cases = index.nearest(np.array([2.0, 0.2]), k=3)  # the scale of the query does not matter: cosine
    assert [c.name for c in cases] == ["case0.jpg", "case2.jpg", "case1.jpg"]
    assert cases[0].similarity == pytest.approx(2.0 / np.hypot(2.0, 0.2)) and cases[1].similarity == pytest.approx(2.2 / np.hypot(2.0, 0.2) / np.sqrt(2))
    assert [c.label for c in cases] == ["Oblique", "Greenstick", "Spiral"]
    assert [(c.near_duplicate, c.flagged) for c in cases] == [(True, False), (True, False), (False, True)]  # groups 5 twice, 7 once
    assert cases[2].caption() == f"Spiral, similarity {cases[2].similarity:.2f} · label doubted"
    assert cases[0].caption().endswith(" · has a near-copy") and "doubted" not in cases[0].caption()
    assert Image.open(io.BytesIO(cases[0].thumbnail)).size == (40, 30)


def test_the_vote_counts_the_k_nearest_labels_and_a_tie_goes_to_the_nearer_case():
    index = index_of([[1, 0], [0.9, 0.1], [0.8, 0.3], [0, 1]], [1, 0, 0, 2])
    votes = index.vote(np.array([[1.0, 0.0]]), k=3)[0]
    assert votes.argmax() == 0 and votes[0] == pytest.approx(2 / 3, abs=0.1) and votes[2] == 0  # two of three are Oblique
    tie = index.vote(np.array([[1.0, 0.0]]), k=2)[0]  # one Spiral (nearest), one Oblique
    assert tie.argmax() == 1 and tie[1] - tie[0] < 0.5
    assert np.argsort(-index.vote(np.array([[0.0, 1.0]]), k=1)[0])[0] == 2


def test_an_index_round_trips_and_one_from_other_weights_is_refused(tmp_path):
    index = index_of([[1, 0, 0], [0, 1, 0]], [0, 1], flagged=[True, False], groups=[3, 3])
    index.weights_stamp = "abc"
    index.save(tmp_path)
    loaded = CaseIndex.load(tmp_path, "abc")
    assert loaded.names == index.names and loaded.labels == LABELS and loaded.credit == "credit line"
    assert loaded.thumbnails == index.thumbnails and loaded.flagged.tolist() == [True, False] and loaded.near_duplicate.all()
    np.testing.assert_allclose(loaded.features, index.features, atol=1e-3)  # stored as float16
    with pytest.raises(ValueError, match="built from other weights.*--similar_cases"):
        CaseIndex.load(tmp_path, "another")
    assert CaseIndex.load(tmp_path / "none") is None
    with pytest.raises(ValueError, match="one target, name, thumbnail"):
        CaseIndex(np.zeros((2, 3)), np.zeros(1, int), LABELS, ["a"], [b""], np.zeros(1, bool), np.zeros(1, int), "")


def test_build_index_embeds_in_batches_and_keeps_order(tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(5)]
    for i, path in enumerate(paths):
        synthetic_xray(i, (64, 48)).save(path)
    batches = []

    def embed(batch):
        batches.append(len(batch))
        return np.array([[float(Path(p).stem), 1.0] for p in batch])

    index = build_index(embed, Image.open, paths, [0, 1, 2, 0, 1], LABELS, "credit", groups=[0, 0, 1, 2, 2], batch_size=2)
    assert batches == [2, 2, 1] and index.names == [f"{i}.png" for i in range(5)]
    assert index.near_duplicate.tolist() == [True, True, False, True, True]
    assert max(Image.open(io.BytesIO(t)).size[0] for t in index.thumbnails) <= 112


def test_only_the_shipped_data_gets_an_index_unasked():
    shipped = {"grouped_splits": True, "arguments": {"split_manifest": "auto"}}
    own = {"grouped_splits": False, "arguments": {"split_manifest": "auto"}}
    assert similar_cases_wanted("auto", shipped) and not similar_cases_wanted("auto", own)
    assert similar_cases_wanted("yes", own) and not similar_cases_wanted("no", shipped)


def test_the_shipped_model_shows_six_credited_cases_from_the_same_forward_pass(tmp_path):
    path = REPO / SHIPPED_MODEL / SIMILAR_CASES_FILE
    assert path.stat().st_size < 8e6
    predictor = load_predictor(SHIPPED_MODEL, "onnx")
    index = predictor.similar_cases
    assert index is not None and index.credit == DATASET_ATTRIBUTION and len(index.names) > 800
    assert index.labels == predictor.labels
    labels, text, shown, cases = RequestHandler(predictor, outputs=OutputImages(folder=tmp_path))(str(REPO / "examples" / "spiral_fracture.jpg"), True)
    assert len(cases) == 6 and all(Path(file).is_file() for file, _ in cases)
    similarities = [float(caption.split("similarity ")[1].split(" ")[0]) for _, caption in cases]
    assert similarities == sorted(similarities, reverse=True) and all(caption.split(",")[0] in predictor.labels for _, caption in cases)
    # the cases come from the embedding of the forward pass that classified the image
    embedding = predictor.analyse(str(REPO / "examples" / "spiral_fracture.jpg")).prediction.embedding
    assert [c.name for c in index.nearest(embedding)] == [c.name for c in index.nearest(predictor.embeddings([str(REPO / "examples" / "spiral_fracture.jpg")]))]
