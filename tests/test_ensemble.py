"""Ensemble checkpoints: `bonebreak add-member` adds a partner model; the served classifier (app,
predict CLI, evaluation) is then an Ensemble answering with the mean of the members' calibrated probabilities."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from conftest import REPO, synthetic_xray

from bonebreak.commands import add_member, export
from bonebreak.common.checkpoint_format import CLASS_MAPS, ENSEMBLE_FILE, LOGITS, ONNX_FILE, ModelLoadError
from bonebreak.data.preprocess import PreprocessConfig
from bonebreak.models.members import add_ensemble_member
from bonebreak.models.torch_backend import TorchForward, load_classifier
from bonebreak.serving.checkpoint_info import ensemble_members
from bonebreak.serving.ensemble import Ensemble
from bonebreak.serving.heatmaps import class_activation_map, upsample
from bonebreak.serving.loader import load_predictor
from bonebreak.serving.onnx_runtime import OnnxForward
from bonebreak.serving.predictor import Predictor
from bonebreak.serving.ui import heatmap_label


@pytest.fixture()
def ensemble(tiny_vit: Path, tiny_convnext: Path, tmp_path: Path) -> Path:
    """A tiny ViT (this folder's own model) with a tiny ConvNeXt partner: two preprocessings, one label list."""
    folder = tmp_path / "ensemble"
    shutil.copytree(tiny_vit, folder)
    add_member.main(["--model_path", str(folder), "--member", str(tiny_convnext), "--name", "convnext", "--no_evaluate"])
    return folder


def images(n: int = 5) -> list:
    return [synthetic_xray(seed, (90 + 7 * seed, 70)) for seed in range(n)]


def test_an_ensemble_serves_the_mean_of_its_members(ensemble, tiny_vit, tiny_convnext):
    assert json.loads((ensemble / ENSEMBLE_FILE).read_text()) == {"members": ["members/convnext"]}
    assert ensemble_members(ensemble) == [ensemble / "members" / "convnext"]
    both = load_classifier(ensemble, device="cpu")
    alone = [load_classifier(folder, device="cpu") for folder in (tiny_vit, tiny_convnext)]
    assert isinstance(both, Ensemble) and len(both.members) == 2 and all(isinstance(one, Predictor) for one in alone)
    expected = np.mean([predictor.probabilities(images()) for predictor in alone], axis=0)
    assert not np.allclose(alone[0].probabilities(images()), alone[1].probabilities(images()), atol=1e-3)  # the mean is not either one
    np.testing.assert_allclose(both.probabilities(images(), batch_size=2), expected, atol=1e-6)
    # Every path of the Predictor gives the same ensemble probabilities.
    for i, image in enumerate(images()):
        for prediction in (both.predict(image), both.analyse(image).prediction, both.predictions([image])[0]):
            np.testing.assert_allclose([prediction.probabilities[label] for label in both.labels], expected[i], atol=1e-6)
    analysis = both.analyse(images()[0])
    assert analysis.heatmap is not None and analysis.heatmap_label == analysis.prediction.top_label  # for the ensemble's top class
    assert "member 1: inference backend PyTorch" in both.description
    assert "first of the 2 ensemble models" in heatmap_label(both) and "first" not in heatmap_label(alone[0])
    # Fitting a temperature needs this folder's own raw model, without partners.
    own = load_predictor(ensemble, torch_forward=partial(TorchForward.from_checkpoint, device="cpu"), calibrated=False)
    assert isinstance(own, Predictor) and own.temperature == 1.0
    np.testing.assert_allclose(own.probabilities(images()), alone[0].probabilities(images()), atol=1e-6)  # the ViT's alone


def test_export_writes_every_members_onnx_and_onnx_serves_the_same_ensemble(ensemble):
    report = export.main(["--model_path", str(ensemble)])
    assert set(report["members"]) == {"convnext"}
    assert (ensemble / ONNX_FILE).is_file() and (ensemble / "members" / "convnext" / ONNX_FILE).is_file()
    onnx = load_classifier(ensemble, device="cpu", backend="onnx")
    assert [type(member.forward) for member in onnx.members] == [OnnxForward, OnnxForward]
    torch_ = load_classifier(ensemble, device="cpu", backend="torch")
    assert [type(member.forward) for member in torch_.members] == [TorchForward, TorchForward]
    np.testing.assert_allclose(onnx.probabilities(images()), torch_.probabilities(images()), atol=1e-4)


def test_members_must_share_labels_and_a_damaged_list_is_named(ensemble, tiny_vit, tmp_path):
    other = tmp_path / "other_labels"
    shutil.copytree(tiny_vit, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="must share one label list"):
        add_ensemble_member(ensemble, other)
    with pytest.raises(ModelLoadError, match="is an ensemble itself"):
        add_ensemble_member(tiny_vit, ensemble)
    with pytest.raises(ModelLoadError, match="already has a member named 'convnext'"):
        add_ensemble_member(ensemble, tiny_vit, "convnext")
    with pytest.raises(ModelLoadError, match="not a checkpoint folder"):
        add_ensemble_member(ensemble, tmp_path / "missing")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_vit, damaged)
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="damaged or mismatched"):
        add_ensemble_member(ensemble, damaged, "damaged")
    assert sorted(p.name for p in (ensemble / "members").iterdir()) == ["convnext"]  # no staging folder left behind
    assert ensemble_members(ensemble) == [ensemble / "members" / "convnext"]  # nothing half-added

    (ensemble / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../elsewhere"]}))
    with pytest.raises(ModelLoadError, match="bonebreak add-member"):
        load_classifier(ensemble, device="cpu")
    (ensemble / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="is damaged"):
        load_classifier(ensemble, device="cpu")


def test_add_member_evaluates_the_ensemble_and_its_card_says_what_is_whose(trained_vit, handful, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(trained_vit, folder)
    single = json.loads((folder / "metrics.json").read_text())
    add_member.main(["--model_path", str(folder), "--member", str(trained_vit), "--name", "twin", "--data_dir", str(handful)])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [member["path"] for member in metrics["ensemble"]["members"]] == ["members/twin"]
    assert metrics["ensemble"]["members"][0]["validation"] == single["validation"]  # the member's own record travels with it
    report = json.loads((folder / "eval_test" / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(single["test"]["accuracy"])  # two identical members score as one
    card = (folder / "README.md").read_text()
    assert "**An ensemble.**" in card and "`members/twin/`" in card and "load `" in card
    assert "grouped 5-fold CV" not in card.split("## Results")[1].split("##")[0]  # no single-model CV row in the ensemble's table


def test_add_member_command_names_its_error_without_a_traceback(tiny_vit, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bonebreak", "add-member", "--model_path", str(tiny_vit), "--member", str(tmp_path / "nope"),
                             "--no_evaluate"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "error:" in result.stderr and "not a checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "bonebreak", "add-member", "--model_path", str(tiny_vit), "--member", str(tiny_vit)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "pass --no_evaluate" in result.stderr and not (tiny_vit / "ensemble.json").exists()



# --- the ensemble's heat map, with fake networks ------------------------------------------------------

LABELS = ["A", "B", "C", "D"]
FLAT = PreprocessConfig(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels = grey level / 255
HOT_SPOTS = [(0, 0), (0, 3), (3, 0), (3, 3)]  # each class's map peaks in its own corner of the 4 x 4 feature map
CLASS_MAP_VALUES = np.zeros((len(LABELS), 4, 4), np.float32)
for _k, _spot in enumerate(HOT_SPOTS):
    CLASS_MAP_VALUES[(_k, *_spot)] = 1.0
# grey level of a flat image -> (the first member's own top class, the ensemble's top class): different every time
DISAGREEMENTS = {40: ("A", "B"), 100: ("B", "C"), 160: ("D", "A"), 220: ("C", "D")}


def member_probabilities(level: int, member: int) -> np.ndarray:
    """Member 0 alone prefers the first class of the pair (0.50 against 0.40); member 1 is sure of the second
    (0.80), so the mean prefers the second (0.60 against 0.275)."""
    own, mean = (LABELS.index(label) for label in DISAGREEMENTS[level])
    probs = np.full(len(LABELS), 0.1 / (len(LABELS) - 2) if member == 0 else 0.15 / (len(LABELS) - 2))
    probs[own], probs[mean] = (0.50, 0.40) if member == 0 else (0.05, 0.80)
    return probs


class FakeForward:
    """A numpy 'network' that reads the grey level of a flat image and answers that image's scripted probabilities."""

    output_names = [LOGITS, CLASS_MAPS]

    def __init__(self, member: int) -> None:
        self.member = member
        self.description = f"fake numpy network {member}"

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        levels = [int(round(float(image.mean()) * 255)) for image in pixels]
        logits = np.log([member_probabilities(level, self.member) for level in levels]).astype(np.float32)
        return {LOGITS: logits, CLASS_MAPS: np.repeat(CLASS_MAP_VALUES[None], len(pixels), axis=0)}


def test_an_ensembles_heatmap_is_for_the_ensembles_top_class_not_the_first_members():
    ensemble = Ensemble([Predictor(LABELS, FLAT, FakeForward(0)), Predictor(LABELS, FLAT, FakeForward(1))])
    for level, (own, mean) in DISAGREEMENTS.items():
        image = Image.new("RGB", (48, 40), (level, level, level))
        assert ensemble.members[0].predict(image).top_label == own  # the first member alone answers otherwise
        analysis = ensemble.analyse(image)
        assert analysis.prediction.top_label == mean and analysis.prediction.top_probability == pytest.approx(0.6)
        assert analysis.heatmap_label == mean, f"grey {level}: heat map for {analysis.heatmap_label}, answer {mean}"
        expected = upsample(class_activation_map(CLASS_MAP_VALUES[LABELS.index(mean)]), (32, 32))
        np.testing.assert_allclose(analysis.heatmap, expected, atol=1e-6)  # the map itself is the answer's class's
        assert ensemble.predict(image).top_label == mean
        asked = ensemble.analyse(image, label=own)  # a map asked for by name is for that class
        assert asked.heatmap_label == own and asked.prediction.top_label == mean
