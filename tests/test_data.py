"""Layouts, label names, broken files, splits and clear failures of bonebreak.data (layouts, loading, splits)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from bonebreak.data.layouts import clean_label, detect_layout, resolve_data_dir
from bonebreak.data.loading import image_paths, load_splits
from bonebreak.data.splits import DatasetError
from conftest import write_image, write_manifest

CLASSES = ["Hairline Fracture", "Avulsion fracture", "Fracture Dislocation"]
CLEAN = ["Avulsion", "Fracture Dislocation", "Hairline"]


def add_broken(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    good = write_image(folder / "cut_source.png", 99)
    (folder / "cut.png").write_bytes(good.read_bytes()[:200])
    good.unlink()
    return ["zero.jpg", "notes.jpg", "cut.png"]


def make_kaggle(root: Path, n_train: int = 8, n_test: int = 2) -> Path:
    seed = 0
    for name in CLASSES:
        for split, n in (("Train", n_train), ("Test", n_test)):
            for i in range(n):
                seed += 1
                write_image(root / name / split / f"{i}.jpg", seed)
    return root


def make_roboflow(root: Path) -> Path:
    seed = 100
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        for name in CLASSES:
            for i in range(n):
                seed += 1
                write_image(root / split / name.replace(" ", "_") / f"{i}.png", seed)
    return root


def make_plain(root: Path) -> Path:
    for k, name in enumerate(CLASSES):
        for i in range(7):
            write_image(root / name / f"{i}.png", 200 + 10 * k + i)
    return root


@pytest.mark.parametrize(
    "folder, expected",
    [("Hairline Fracture", "Hairline"), ("Avulsion fracture", "Avulsion"), ("Fracture Dislocation", "Fracture Dislocation"),
     ("spiral_fracture", "Spiral"), ("greenstick-fracture", "Greenstick"), ("  Oblique   Fracture ", "Oblique")],
)
def test_clean_label(folder, expected):
    assert clean_label(folder) == expected


def test_kaggle_layout_with_broken_files(tmp_path, caplog):
    root = make_kaggle(tmp_path / "kaggle")
    broken = add_broken(root / "Hairline Fracture" / "Train")
    assert detect_layout(root) == "kaggle"
    with caplog.at_level(logging.INFO, logger="bonebreak.data"):
        data = load_splits(root, val_fraction=0.25, seed=1)
    assert data.labels == CLEAN  # not "Train"/"Test", which a naive imagefolder load would give
    assert sorted(p.name for p, _ in data.broken) == sorted(broken)
    for name in broken:  # one warning naming each file
        assert sum(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    assert data.counts["test"] == {label: 2 for label in CLEAN}
    assert data.counts["validation"] == {label: 2 for label in CLEAN}  # stratified: 25% of 8 per class
    assert sum(data.counts["train"].values()) == 18
    assert "train: 18 images" in caplog.text and "test: 6 images" in caplog.text
    features = data.splits["train"].features
    assert features["label"].names == CLEAN and "image" in features


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    root = make_kaggle(tmp_path / "kaggle")
    first, again, other = (load_splits(root, val_fraction=0.25, seed=s) for s in (1, 1, 2))
    paths = lambda d, s: sorted(x["path"] for x in d.splits[s].cast_column("image", __import__("datasets").Image(decode=False))["image"])
    assert paths(first, "validation") == paths(again, "validation")
    assert paths(first, "validation") != paths(other, "validation")
    assert not set(paths(first, "validation")) & set(paths(first, "train"))
    assert not set(paths(first, "test")) & (set(paths(first, "train")) | set(paths(first, "validation")))


def test_roboflow_layout_keeps_its_validation_split(tmp_path):
    root = make_roboflow(tmp_path / "rf")
    assert detect_layout(root) == "roboflow"
    data = load_splits(root)
    assert data.labels == CLEAN
    assert {s: sum(c.values()) for s, c in data.counts.items()} == {"train": 18, "validation": 6, "test": 6}


def test_plain_layout_carves_validation_and_has_no_test(tmp_path):
    root = make_plain(tmp_path / "plain")
    add_broken(root / "Avulsion fracture")
    assert detect_layout(root) == "plain"
    data = load_splits(root, val_fraction=0.3)
    assert set(data.splits) == {"train", "validation"}
    assert all(v >= 2 for v in data.counts["validation"].values())
    assert len(data.broken) == 3


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*--data_dir"):
        load_splits(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_splits(tmp_path / "empty")
    for i in range(4):
        write_image(tmp_path / "one" / "Spiral Fracture" / f"{i}.png", i)
    with pytest.raises(DatasetError, match="at least 2 class"):
        load_splits(tmp_path / "one")
    with pytest.raises(ValueError, match="--val_fraction"):
        load_splits(tmp_path / "one", val_fraction=1.5)


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("BONEBREAK_DATA", raising=False)
    assert resolve_data_dir(None) == Path("data/bone-break")
    monkeypatch.setenv("BONEBREAK_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"


@pytest.mark.full_data  # the counts of all 1,129 images
def test_real_dataset_counts_match_provenance(real_data):
    data = load_splits(real_data, check_images=False)
    assert data.layout == "kaggle" and len(data.labels) == 10
    assert sum(data.counts["test"].values()) == 140
    assert sum(data.counts["train"].values()) + sum(data.counts["validation"].values()) == 989
    assert data.counts["test"]["Hairline"] == 10 and data.counts["test"]["Fracture Dislocation"] == 19


def test_grouped_manifest_gives_clean_test_and_its_validation(tmp_path):
    root = make_kaggle(tmp_path / "kaggle", n_train=4, n_test=2)
    leaked = {"Hairline Fracture/Test/0.jpg"}
    validation = {f"{name}/Train/0.jpg" for name in CLASSES}
    manifest = write_manifest(root, tmp_path / "manifest.csv", leaked, validation)
    data = load_splits(root, split_manifest=manifest)
    assert data.grouped and data.manifest == manifest
    assert {k: sum(v.values()) for k, v in data.counts.items()} == {"train": 9, "validation": 3, "test": 6, "clean_test": 5}
    assert data.counts["clean_test"]["Hairline"] == 1
    # "auto" only uses the shipped manifest for the folder it describes; explicit mismatches fail.
    assert not load_splits(root, split_manifest="auto").grouped
    (root / "Avulsion fracture" / "Train" / "extra.png").write_bytes((root / "Avulsion fracture" / "Train" / "0.jpg").read_bytes())
    with pytest.raises(DatasetError, match="does not list every image"):
        load_splits(root, split_manifest=manifest)
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits(root, split_manifest=tmp_path / "missing.csv")


@pytest.mark.full_data  # the shipped manifest lists every file of the full dataset
def test_shipped_manifest_matches_the_real_dataset(real_data):
    data = load_splits(real_data, check_images=False)
    assert data.grouped
    sizes = {k: sum(v.values()) for k, v in data.counts.items()}
    assert sizes["train"] + sizes["validation"] == 989 and sizes["test"] == 140 and 90 <= sizes["clean_test"] < 140


def test_decoded_cache_gives_the_same_inputs_as_streaming(handful):
    import torch

    from bonebreak.data.loading import DecodedImages
    from bonebreak.data.preprocess import PreprocessConfig
    from bonebreak.training.augment import eval_transform
    from bonebreak.training.trainer import model_inputs

    split = load_splits(handful, split_manifest="none").splits["train"]
    transform = eval_transform(PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3))
    cached, streamed = model_inputs(split, transform, cache=True), model_inputs(split, transform, cache=False)
    assert isinstance(cached, DecodedImages) and len(cached) == len(split)
    for i in (0, len(split) - 1):
        assert cached[i]["labels"] == streamed[i]["labels"]
        assert torch.equal(cached[i]["pixel_values"], streamed[i]["pixel_values"])


def test_roboflow_valid_copy_of_a_test_image_leaks_it_out_of_clean_test(tmp_path):
    """A Roboflow export's valid/ folder is Train-side data too: a test/ image with a copy in valid/ is test_leaked
    in the audit's grouped manifest, and load_splits keeps it in test but out of clean_test."""
    from bonebreak.audit.reports import audit_dataset

    root = tmp_path / "rf"
    seed = 0  # seeds 0..14 of synthetic_xray are >= 4 hash bits apart: with hash_threshold 0 only the planted copies pair
    for split, n in (("train", 3), ("valid", 1), ("test", 1)):
        for name in CLASSES:
            for i in range(n):
                write_image(root / split / name.replace(" ", "_") / f"{i}.png", seed)
                seed += 1
    hairline, avulsion = "Hairline_Fracture", "Avulsion_fracture"
    (root / "test" / hairline / "copy_of_valid.png").write_bytes((root / "valid" / hairline / "0.png").read_bytes())
    (root / "test" / avulsion / "copy_of_train.png").write_bytes((root / "train" / avulsion / "1.png").read_bytes())  # control
    manifest = tmp_path / "manifest.csv"
    summary = audit_dataset(str(root), tmp_path / "audit", manifest, hash_threshold=0, cosine_threshold=1.0, embeddings=False,
                            val_fraction=0.25, seed=1, max_sheet_rows=0)
    assert summary["images"] == 17 and summary["duplicate_groups"] == 2  # exactly the two planted copies, nothing else

    with open(manifest, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    leaked_copy, valid_source = f"test/{hairline}/copy_of_valid.png", f"valid/{hairline}/0.png"
    assert rows[leaked_copy]["group"] == rows[valid_source]["group"]
    assert rows[valid_source]["split"] in ("train", "validation")
    assert rows[leaked_copy]["split"] == "test_leaked"
    assert rows[f"test/{avulsion}/copy_of_train.png"]["split"] == "test_leaked"
    assert {path for path, row in rows.items() if row["split"] == "clean_test"} == {f"test/{name.replace(' ', '_')}/0.png" for name in CLASSES}

    data = load_splits(root, split_manifest=manifest)
    assert data.grouped and data.layout == "roboflow"
    relative = lambda split: {Path(p).relative_to(root).as_posix() for p in image_paths(data.splits[split])}
    assert leaked_copy in relative("test") and leaked_copy not in relative("clean_test")
    assert {k: sum(v.values()) for k, v in data.counts.items() if k in ("test", "clean_test")} == {"test": 5, "clean_test": 3}
