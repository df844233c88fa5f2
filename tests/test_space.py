"""The exported Space (`bonebreak export-space`), written for the shipped model: that the folder alone, with the
training stack unimportable, answers `/predict` exactly as the full app does. (That the README's `hf upload`
command uploads that folder as the installed CLI reads it is tests/test_space_command.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from bonebreak.common.checkpoint_format import WEIGHTS_FILE
from bonebreak.common.notices import RESEARCH_DEMO
from bonebreak.serving.space_folder import write_space
from conftest import REPO, start_app
from test_requirements import BLOCKER
from test_requirements_pins import pins
from test_space_folder import SHIPPED, TRAINING_STACK


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The shipped model exported as a Space, the way the README's deploy section writes it."""
    from bonebreak.commands import run

    output = tmp_path_factory.mktemp("export") / "space"
    run("export-space", ["--model_path", str(SHIPPED), "--output", str(output), "--examples_dir", str(REPO / "examples")])
    return output


def test_the_folder_holds_what_the_space_needs_and_uploads_whole(space):
    files = sorted(p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file())
    assert {"app.py", "requirements.txt", "README.md", "LICENSE", "model/model.onnx", "model/xray_check.onnx", "model/config.json",
            "model/xray_check.safetensors", "model/README.md", "bonebreak/serving/fracture_info.json", "examples/ATTRIBUTION.md",
            "examples/spiral_fracture.jpg"} <= set(files)
    assert f"model/{WEIGHTS_FILE}" not in files and not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == files  # `hf upload space/` sends them all
    assert 20e6 < sum((space / f).stat().st_size for f in files) < 40e6

    meta = metadata_load(space / "README.md")
    assert (meta["sdk"], meta["app_file"], meta["python_version"]) == ("gradio", "app.py", f"{sys.version_info.major}.{sys.version_info.minor}")
    assert meta["sdk_version"] == pins(REPO / "requirements.txt")["gradio"].split("==")[1], "the Space's Gradio differs from requirements.txt"
    page = (space / "README.md").read_text()
    assert RESEARCH_DEMO in page and "### Intended use and limitations" in page and "CC BY 4.0" in page

    again = write_space(SHIPPED, space, examples_dir=REPO / "examples", overwrite=True)  # an earlier export is replaced
    assert sorted(again) == files


def test_the_space_answers_like_the_full_app_with_the_training_stack_unimportable(space, tmp_path):
    """Started the way a Space starts it, from its own folder; the full app's answer comes from the same request
    handler with the repository's loader (ONNX Runtime there too, with PyTorch importable)."""
    from gradio_client import Client, handle_file

    from bonebreak.models.serving_backend import load_served
    from bonebreak.serving.ui import RequestHandler

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=sorted(TRAINING_STACK))))
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "PYTHONPATH": str(blocker)}  # no checkout on the path: the Space's own package
    probe = "import bonebreak, importlib.util as u; print(bonebreak.__file__, u.find_spec('torch'))"
    where, torch = subprocess.run([sys.executable, "-c", probe], cwd=space, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where).resolve() == (space / "bonebreak" / "__init__.py").resolve() and torch == "None"

    full = RequestHandler(load_served(SHIPPED))
    process, url = start_app(space, env, tmp_path / "space.log")
    try:
        client = Client(url, verbose=False)
        for example in ("spiral_fracture.jpg", "greenstick_fracture.jpg", "avulsion_fracture.jpg"):
            labels, text, heatmap, cases = client.predict(handle_file(str(space / "examples" / example)), True, api_name="/predict")
            want_labels, want_text, want_heatmap, want_cases = full(str(REPO / "examples" / example), True)
            got = {c["label"]: c["confidence"] for c in labels["confidences"]}
            assert list(got) == list(want_labels) and text == want_text
            assert max(abs(got[k] - want_labels[k]) for k in got) < 1e-5
            assert Path(heatmap).read_bytes() == Path(want_heatmap).read_bytes()  # the same overlay, to the byte
            assert [case["caption"] for case in cases] == [caption for _, caption in want_cases] and len(cases) == 6
            assert [Path(case["image"]).read_bytes() for case in cases] == [Path(file).read_bytes() for file, _ in want_cases]
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = (tmp_path / "space.log").read_text()
    assert "ONNX Runtime serves every network" in log and "Traceback" not in log
