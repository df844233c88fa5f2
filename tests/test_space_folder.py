"""What `bonebreak export-space` puts into a Space folder, and what it refuses (fast; the export itself, served with
the training stack unimportable, is tests/test_space.py)."""

from __future__ import annotations

import shutil

import pytest

from bonebreak.common.checkpoint_format import ONNX_FILE, SHIPPED_MODEL, WEIGHTS_FILE
from bonebreak.serving import space_folder
from bonebreak.serving.checkpoint_info import read_checkpoint_info
from bonebreak.serving.space_folder import demote_headings, import_closure, imported_names, write_space
from conftest import REPO
from test_requirements_pins import normalise, pins

TRAINING_STACK = ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets")
SHIPPED = REPO / SHIPPED_MODEL


def test_relative_imports_resolve_and_dynamic_imports_are_refused():
    source = "from ..common import files\nfrom .loader import load_classifier\nimport numpy as np\ndef f():\n    import onnxruntime\n"
    assert imported_names(source, "bonebreak.serving.ui") == {
        "bonebreak.common", "bonebreak.common.files", "bonebreak.serving.loader", "bonebreak.serving.loader.load_classifier",
        "numpy", "onnxruntime"}
    assert "bonebreak.serving.predictor" in imported_names("from .predictor import Predictor", "bonebreak.serving", is_package=True)
    with pytest.raises(ValueError, match="line 2: a dynamic import"):
        imported_names("import importlib\nimportlib.import_module('torch')", "bonebreak.serving.x")


def test_the_space_takes_the_serving_code_and_nothing_of_the_training_stack():
    files, third_party = import_closure(space_folder.SPACE_APP)
    names = {path.relative_to(space_folder.PACKAGE_DIR).as_posix() for path in files}
    assert {"__init__.py", "serving/__init__.py", "serving/ui.py", "serving/loader.py", "serving/predictor.py", "serving/xray_check.py",
            "serving/heatmaps.py", "data/__init__.py", "data/decode.py", "data/preprocess.py", "common/checkpoint_format.py"} <= names
    assert not [name for name in names if name.startswith(("training/", "models/", "lab/", "commands/", "evaluation/", "audit/"))]
    assert "serving/space_folder.py" not in names and "data/loading.py" not in names  # the builder and dataset loading stay home
    assert {"gradio", "numpy", "onnxruntime", "PIL", "pydicom"} <= third_party
    assert not set(TRAINING_STACK) & third_party


def test_requirements_pin_what_the_space_imports_at_the_repositorys_pins():
    _, requirements = space_folder.code_files()
    repository = pins(REPO / "requirements.txt")
    assert {normalise(line.split("==")[0]) for line in requirements} >= {"gradio", "onnxruntime", "numpy", "pillow", "pydicom"}
    for line in requirements:
        assert repository.get(normalise(line.split("==")[0])) == line, f"{line}: not requirements.txt's pin"
    assert not {normalise(name) for name in TRAINING_STACK} & {normalise(line.split("==")[0]) for line in requirements}


def test_a_model_card_sits_one_heading_level_down_and_code_is_untouched():
    card = "# Title\ntext\n## Results\n```bash\n# a shell comment\n```\n### Deep"
    assert demote_headings(card) == "## Title\ntext\n### Results\n```bash\n# a shell comment\n```\n#### Deep"


def test_an_ensemble_ships_each_members_serving_files_where_its_list_points(tmp_path):
    folder = tmp_path / "model"
    for where in ("", "members/lite1/"):
        for name in ("config.json", "model.onnx", "model.safetensors", "metrics.json", "training_curves.png"):
            (folder / where).mkdir(parents=True, exist_ok=True)
            (folder / where / name).write_text("{}")
    (folder / "ensemble.json").write_text('{"members": ["members/lite1"]}')
    assert sorted(space_folder.checkpoint_files(folder)) == [
        "model/config.json", "model/ensemble.json", "model/members/lite1/config.json", "model/members/lite1/model.onnx", "model/model.onnx"]


def test_a_checkpoint_folder_with_only_its_onnx_copy_serves(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns(WEIGHTS_FILE, "eval_*", "*.png"))
    assert read_checkpoint_info(folder).labels == read_checkpoint_info(SHIPPED).labels
    (folder / ONNX_FILE).unlink()
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} is missing"):
        read_checkpoint_info(folder)


def test_export_refuses_what_it_cannot_serve_or_must_not_replace(tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(SHIPPED, stale, ignore=shutil.ignore_patterns("eval_*", "*.png"))
    (stale / WEIGHTS_FILE).write_bytes((stale / WEIGHTS_FILE).read_bytes()[:-1] + b" ")  # other weights than model.onnx's
    with pytest.raises(ValueError, match="cannot be served without PyTorch.*bonebreak export --model_path"):
        write_space(stale, tmp_path / "space")
    assert not (tmp_path / "space").exists() and [p.name for p in tmp_path.iterdir()] == ["stale"]  # nothing half-written

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty: pass --overwrite"):
        write_space(SHIPPED, mine)
    with pytest.raises(ValueError, match="not a folder written by export-space"):
        write_space(SHIPPED, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (mine / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no ATTRIBUTION.md"):
        write_space(SHIPPED, tmp_path / "space", examples_dir=mine)
