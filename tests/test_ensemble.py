"""Ensemble checkpoints: `python -m bonebreak.add_member` adds a partner model; the Predictor (app,
predict CLI, evaluation) then serves the mean of the members' calibrated probabilities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, synthetic_xray

from bonebreak import add_member, export
from bonebreak.inference import Predictor
from bonebreak.ensembles import ENSEMBLE_FILE, add_ensemble_member, ensemble_members
from bonebreak.models import ModelLoadError
from bonebreak.onnx_backend import ONNX_FILE
from bonebreak.ui import heatmap_label


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
    both = Predictor.from_checkpoint(ensemble, device="cpu")
    alone = [Predictor.from_checkpoint(folder, device="cpu") for folder in (tiny_vit, tiny_convnext)]
    expected = np.mean([predictor.probabilities(images()) for predictor in alone], axis=0)
    assert not np.allclose(alone[0].probabilities(images()), alone[1].probabilities(images()), atol=1e-3)  # the mean is not either one
    np.testing.assert_allclose(both.probabilities(images(), batch_size=2), expected, atol=1e-6)
    # Every path of the Predictor gives the same ensemble probabilities.
    for i, image in enumerate(images()):
        for prediction in (both.predict(image), both.analyse(image).prediction, both.predictions([image])[0]):
            np.testing.assert_allclose([prediction.probabilities[label] for label in both.labels], expected[i], atol=1e-6)
    analysis = both.analyse(images()[0])
    assert analysis.heatmap is not None and analysis.heatmap_label == analysis.prediction.top_label  # for the ensemble's top class
    assert "ensemble partner: inference backend PyTorch" in both.backend_description
    assert "first of the 2 ensemble models" in heatmap_label(both) and "first" not in heatmap_label(alone[0])
    # Fitting a temperature needs this folder's own raw model, without partners.
    assert Predictor.from_checkpoint(ensemble, device="cpu", calibrated=False).partners == []


def test_export_writes_every_members_onnx_and_onnx_serves_the_same_ensemble(ensemble):
    report = export.main(["--model_path", str(ensemble)])
    assert set(report["members"]) == {"convnext"}
    assert (ensemble / ONNX_FILE).is_file() and (ensemble / "members" / "convnext" / ONNX_FILE).is_file()
    onnx = Predictor.from_checkpoint(ensemble, device="cpu", backend="onnx")
    assert onnx.backend == "onnx" and [partner.backend for partner in onnx.partners] == ["onnx"]
    torch_ = Predictor.from_checkpoint(ensemble, device="cpu", backend="torch")
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
    with pytest.raises(ModelLoadError, match="bonebreak.add_member"):
        Predictor.from_checkpoint(ensemble, device="cpu")
    (ensemble / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="is damaged"):
        Predictor.from_checkpoint(ensemble, device="cpu")


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

    result = subprocess.run([sys.executable, "-m", "bonebreak.add_member", "--model_path", str(tiny_vit), "--member", str(tmp_path / "nope"),
                             "--no_evaluate"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "error:" in result.stderr and "not a checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "bonebreak.add_member", "--model_path", str(tiny_vit), "--member", str(tiny_vit)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "pass --no_evaluate" in result.stderr and not (tiny_vit / "ensemble.json").exists()

