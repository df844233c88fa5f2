"""bonebreak check-data: what it prints for a usable folder, and the one-line error for a missing one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonebreak.commands.check_data import main
from conftest import REPO, write_image

COUNTS = {"train": 4, "valid": 2, "test": 1}  # images per class in each split folder


@pytest.fixture
def roboflow_folder(tmp_path: Path) -> Path:
    root = tmp_path / "bone-break"
    seed = 0
    for split, n in COUNTS.items():
        for class_folder in ("Hairline Fracture", "Spiral Fracture", "Fracture Dislocation"):
            for i in range(n):
                seed += 1
                write_image(root / split / class_folder / f"img{i}.jpg", seed)
    (root / "train" / "Spiral Fracture" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    return root


def test_reports_layout_classes_counts_and_broken_files(roboflow_folder, capsys):
    data = main(["--data_dir", str(roboflow_folder)])
    out = capsys.readouterr().out
    assert data.layout == "roboflow" and not data.grouped
    assert f"Data folder: {roboflow_folder.absolute()}" in out
    assert "Layout: roboflow (Roboflow folder export: train|valid|test/<class>/*)" in out
    assert "Classes (3): Fracture Dislocation, Hairline, Spiral" in out
    assert "does not describe this folder, so there is no clean_test; validation: the folder's own validation split" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("class"))
    assert header.split() == ["class", "train", "validation", "test"]
    rows = {line.rsplit(None, 3)[0].strip(): line.split()[-3:] for line in lines[lines.index(header) + 1:] if line.startswith(("Fracture", "Hairline", "Spiral", "total"))}
    assert rows["Hairline"] == ["4", "2", "1"] and rows["Fracture Dislocation"] == ["4", "2", "1"]
    assert rows["Spiral"] == ["4", "2", "1"]  # the broken fifth file is not counted
    assert rows["total"] == ["12", "6", "3"]
    assert "21 readable images, 1 unreadable:" in out
    broken = next(line for line in lines if line.strip().startswith(str(Path("train") / "Spiral Fracture" / "broken.jpg")))
    assert "broken.jpg" in broken and "truncated" in broken.lower()


def test_without_a_validation_folder_it_says_validation_is_carved(roboflow_folder, capsys):
    kaggle = roboflow_folder.parent / "plain"
    for path in sorted((roboflow_folder / "train").rglob("img*.jpg")):
        target = kaggle / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    data = main(["--data_dir", str(kaggle)])
    out = capsys.readouterr().out
    assert data.layout == "plain" and "Layout: plain" in out
    assert "validation: carved out of train (stratified, 15%, seed 42)" in out
    assert "12 readable images, 0 unreadable." in out


def test_missing_folder_is_one_clear_line_and_exit_status_2(tmp_path):
    missing = tmp_path / "nowhere"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("BONEBREAK_DATA", None)
    result = subprocess.run([sys.executable, "-m", "bonebreak", "check-data", "--data_dir", str(missing)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: data folder {missing} does not exist")
    assert "--data_dir PATH" in errors[0] and "BONEBREAK_DATA" in errors[0] and "Getting the data" in errors[0]


def test_default_folder_comes_from_the_environment(roboflow_folder, monkeypatch, capsys):
    monkeypatch.setenv("BONEBREAK_DATA", str(roboflow_folder))
    assert main([]).root == roboflow_folder
    assert f"Data folder: {roboflow_folder.absolute()}" in capsys.readouterr().out
