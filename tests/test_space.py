"""The README's "Deploy as a Space" command: it uploads exactly what the Space needs, and a folder
holding only those files (from the committed tree) serves predictions like a Space would. (That the
installed `hf` CLI reads the command as meant is tests/test_space_command.py.)"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest
from huggingface_hub import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from conftest import REPO, start_app
from test_space_command import README, patterns, upload_command  # the README command, parsed (its fast tests are there)

MODEL_DIR = "checkpoints/bone_break_model/"
NEVER = (".ci/", ".venv/", "tests/", "benchmarks/", "scripts/", "splits/", "reports/", "runs/", "data/", ".gradio/", ".git/")
LOCAL_JUNK = [  # files a working checkout has besides the tracked ones; hf upload reads the folder, not git
    ".git/config", ".venv/lib/python3.11/site-packages/torch/__init__.py", "bonebreak/__pycache__/__init__.cpython-311.pyc",
    "bonebreak/serving/__pycache__/ui.cpython-311.pyc", "bonebreak/evaluation/assets/photos/__pycache__/x.cpython-311.pyc",
    "checkpoints/bone_break_model/checkpoint-10/model.safetensors",
    "checkpoints/bone_break_model/runs/Nov26/events.out.tfevents", "checkpoints/bone_break_model.trainer/optimizer.pt",
    "reports/bone_break_model-test/metrics.json", "runs/cv5/cv.json", "tests/artifacts/app.png", ".gradio/flagged/log.csv",
    "data/bone-break/Spiral Fracture/Train/a.jpg", "tests/__pycache__/conftest.cpython-311.pyc", ".pytest_cache/README.md",
]


def uploaded(paths: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """What `hf upload . --include ... --exclude ...` takes out of these folder-relative paths: the same
    filter and default ignores (.git) that HfApi.upload_folder applies."""
    return list(filter_repo_objects(paths, allow_patterns=include, ignore_patterns=exclude + DEFAULT_IGNORE_PATTERNS))


def tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: no tracked tree to check the upload against")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def readme_images() -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README.read_text()))


def needed(files: list[str]) -> set[str]:
    """Every tracked file the Space needs: the package's code and data files in every sub-package, and its assets."""
    def want(path: str) -> bool:
        p = PurePosixPath(path)
        return (path in {"app.py", "requirements.txt", "README.md", "LICENSE"} or path in readme_images()
                or (p.parts[0] == "bonebreak" and p.suffix in {".py", ".json"})
                or path.startswith(("bonebreak/evaluation/assets/", MODEL_DIR, "examples/")))
    return {path for path in files if want(path)}


def test_upload_takes_exactly_what_the_space_needs():
    include, exclude = patterns(upload_command())
    files = tracked_files()
    sent = uploaded(files, include, exclude)
    want = needed(files)
    for name in ("app.py", "requirements.txt", "README.md", "LICENSE", "bonebreak/__init__.py", "bonebreak/serving/ui.py",
                 "bonebreak/commands/app.py", "bonebreak/serving/fracture_info.json",
                 *(MODEL_DIR + f for f in ("model.safetensors", "model.onnx", "config.json", "xray_check.safetensors",
                                           "xray_check.onnx", "README.md")),
                 "examples/spiral_fracture.jpg", "examples/ATTRIBUTION.md"):
        assert name in want, f"{name} is not tracked"
    assert sorted(want - set(sent)) == [], "files the Space needs that the command leaves out"
    assert sorted(set(sent) - want) == [], "files the command uploads that the Space does not need"
    assert not [p for p in sent if p.startswith(NEVER) or p == ".gitignore"]
    assert uploaded(LOCAL_JUNK, include, exclude) == []

    present = [REPO / p for p in sent if (REPO / p).is_file()]  # another checkout may lack a just-deleted file
    total = sum(p.stat().st_size for p in present)
    assert 25e6 < total < 60e6, f"{total / 1e6:.1f} MB"
    pointers = [p for p in present if p.read_bytes()[:100].startswith(b"version https://git-lfs")]
    assert pointers == [], "git-lfs pointer files instead of content"

    meta = metadata_load(README)
    assert meta["sdk"] == "gradio" and meta["app_file"] in sent and meta["python_version"]
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert meta["sdk_version"] == pins["gradio"], "the Space's Gradio (sdk_version) differs from requirements.txt"


def test_the_uploaded_files_alone_serve_predictions(tmp_path):
    """The committed tree, cut down to what the command uploads, started the way a Space starts it."""
    from gradio_client import Client, handle_file

    include, exclude = patterns(upload_command())
    tracked_files()  # skips outside a git checkout
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    space = tmp_path / "space"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(space, filter="data")
    files = [p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()]
    keep = set(uploaded(files, include, exclude))
    for path in set(files) - keep:
        (space / path).unlink()
    for folder in sorted((p for p in space.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    assert {"app.py", "requirements.txt", MODEL_DIR + "model.onnx", "examples/spiral_fracture.jpg"} <= keep
    assert not [name for name in ("splits", "tests", "benchmarks", "scripts", ".ci") if (space / name).exists()]

    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PYTHONPATH", None)  # the app must import bonebreak from the Space folder, not from this checkout
    where = subprocess.run([sys.executable, "-c", "import bonebreak; print(bonebreak.__file__)"], cwd=space, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve() == (space / "bonebreak" / "__init__.py").resolve()
    process, url = start_app(space, env, tmp_path / "space.log")
    try:
        client = Client(url, verbose=False)
        labels, text, heatmap = client.predict(handle_file(str(space / "examples" / "spiral_fracture.jpg")), True, api_name="/predict")
        assert len(labels["confidences"]) == 3 and labels["label"] == labels["confidences"][0]["label"]
        assert "fracture" in text and Path(heatmap).is_file() and Path(heatmap).stat().st_size > 0
    finally:
        process.terminate()
        process.wait(timeout=30)
