"""Duplicate audit: hashes, grouping, leak-free splits and the CLI (bonebreak.audit, `bonebreak audit`)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from bonebreak.audit.duplicates import (
    DEFAULT_COSINE_THRESHOLD,
    DEFAULT_HASH_THRESHOLD,
    connected_groups,
    cosine_matrix,
    dihedral,
    extract_features,
    hash_distance,
    hash_distance_matrix,
    image_hashes,
    near_duplicate_pairs,
)
from bonebreak.commands.audit import main
from bonebreak.common.files import file_sha256
from bonebreak.data.layouts import scan_folder
from bonebreak.data.splits import DatasetError, Sample, grouped_folds, grouped_splits
from conftest import synthetic_xray


def distinct_image(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """synthetic_xray plus seeded low-frequency shading and shapes, so unrelated seeds hash far apart."""
    rng = np.random.default_rng(seed + 10_000)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    shading = sum(
        rng.uniform(-1, 1) * np.cos(np.pi * (rng.integers(0, 4) * x + rng.integers(0, 4) * y) + rng.uniform(0, 6.3))
        for _ in range(6)
    )
    shading = (shading - shading.min()) / (np.ptp(shading) + 1e-9) * 120
    bone = np.asarray(synthetic_xray(seed, size).convert("L"), dtype=float)
    image = Image.fromarray(np.clip(0.6 * bone + shading, 0, 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.7, 2) * (w, h)
        x1, y1 = (x0, y0) + rng.uniform(0.15, 0.4, 2) * (w, h)
        grey = int(rng.integers(60, 255))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=(grey, grey, grey))
    return image


def reencode(image: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop_edges(image: Image.Image, fraction: float = 0.05) -> Image.Image:
    """Remove ``fraction`` of width and height, split unevenly between the sides like a real crop."""
    w, h = image.size
    return image.crop((int(w * fraction * 0.3), int(h * fraction * 0.7), w - int(w * fraction * 0.7), h - int(h * fraction * 0.3)))


def annotate(image: Image.Image) -> Image.Image:
    """An 'Inked' copy: a red arrow-like line and a label drawn on the picture."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    draw.line((w * 0.15, h * 0.2, w * 0.45, h * 0.45), fill=(230, 20, 20), width=max(2, w // 60))
    draw.text((w * 0.55, h * 0.08), "FX", fill=(255, 0, 0))
    return image


def copies(image: Image.Image) -> dict[str, Image.Image]:
    return {
        "hflip": ImageOps.mirror(image),
        "vflip": ImageOps.flip(image),
        "rot90": image.rotate(90, expand=True),
        "rot270": image.rotate(270, expand=True),
        "resized": image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.Resampling.BILINEAR),
        "jpeg60": reencode(image, 60),
        "crop5": crop_edges(image, 0.05),
        "annotated": annotate(image),
        "annotated+rot90+jpeg": reencode(annotate(image).rotate(90, expand=True), 75),
    }


UNRELATED_SEEDS = (11, 22, 33, 44, 55, 66)


def test_file_sha256_tells_identical_bytes_apart(tmp_path: Path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    distinct_image(1).save(a)
    b.write_bytes(a.read_bytes())
    distinct_image(2).save(c)
    assert file_sha256(a) == file_sha256(b) != file_sha256(c)
    assert len(file_sha256(a)) == 64


def test_dihedral_gives_the_8_distinct_flips_and_rotations():
    array = np.arange(16).reshape(4, 4)
    views = dihedral(array)
    assert len(views) == 8 and np.array_equal(views[0], array)
    assert len({v.tobytes() for v in views}) == 8


def test_hash_distance_ignores_flips_rotations_resizing_and_reencoding():
    original = distinct_image(3)
    for name in ("hflip", "vflip", "rot90", "rot270"):
        assert hash_distance(original, copies(original)[name]) == 0, name
    for name in ("resized", "jpeg60"):
        assert hash_distance(original, copies(original)[name]) <= 2, name
    assert hash_distance(original, copies(original)["crop5"]) <= DEFAULT_HASH_THRESHOLD


def test_hash_distance_is_symmetric_and_large_for_unrelated_images():
    images = [distinct_image(seed) for seed in UNRELATED_SEEDS]
    distances = hash_distance_matrix(np.stack([image_hashes(im) for im in images]))
    assert np.array_equal(distances, distances.T)
    assert np.all(np.diag(distances) == 0)
    off_diagonal = distances[~np.eye(len(images), dtype=bool)]
    assert off_diagonal.min() > 2 * DEFAULT_HASH_THRESHOLD, distances


def test_all_copies_form_one_group_and_unrelated_images_stay_alone():
    original = distinct_image(5)
    images = [original, *copies(original).values()] + [distinct_image(seed) for seed in UNRELATED_SEEDS]
    n_copies = 1 + len(copies(original))
    hashes = np.stack([image_hashes(im) for im in images])
    pairs = near_duplicate_pairs(
        hash_distance_matrix(hashes), cosine_matrix(None, len(images)), [str(i) for i in range(len(images))],
        DEFAULT_HASH_THRESHOLD, DEFAULT_COSINE_THRESHOLD,
    )
    groups = connected_groups(len(images), pairs)
    assert groups[0] == list(range(n_copies))
    assert groups[1:] == [[i] for i in range(n_copies, len(images))]
    assert {kind for *_, kind in pairs} == {"hash"}  # no embeddings were computed


def test_connected_groups_joins_chains_and_keeps_singletons():
    assert connected_groups(6, [(0, 1, "hash"), (1, 2, "hash"), (5, 4, "embedding")]) == [[0, 1, 2], [3], [4, 5]]
    assert connected_groups(3, []) == [[0], [1], [2]]


def test_near_duplicate_pairs_names_what_matched():
    hash_d = np.array([[0, 0, 20, 3], [0, 0, 20, 20], [20, 20, 0, 20], [3, 20, 20, 0]])
    cosine = np.array([[1, 0.99, 0.95, 0.2], [0.99, 1, 0.1, 0.1], [0.95, 0.1, 1, 0.1], [0.2, 0.1, 0.1, 1]])
    pairs = near_duplicate_pairs(hash_d, cosine, ["x", "x", "y", "z"], hash_threshold=6, cosine_threshold=0.9)
    assert pairs == [(0, 1, "exact"), (0, 2, "embedding"), (0, 3, "hash")]


# --- real X-rays through the embedding (a handful of images, one model load) ----------------------


@pytest.fixture(scope="module")
def real_copies(handful: Path, tmp_path_factory) -> Path:
    """Kaggle layout: 2 real Train X-rays with modified copies, plus 2 unrelated real images in Test.

    From the committed fixture: a knee (Hairline) and an ankle film photo (Spiral) as sources, whose
    copies each pass both the hash and the embedding threshold; a pelvis and a knee as the others.
    """
    root = tmp_path_factory.mktemp("real_copies")
    sources = [sorted((handful / c / "Train").iterdir())[i] for c, i in (("Hairline Fracture", 2), ("Spiral Fracture", 0))]
    others = [sorted((handful / c / "Test").iterdir())[0] for c in ("Avulsion fracture", "Pathological fracture")]
    for k, source in enumerate(sources):
        image = Image.open(source).convert("RGB")
        folder = root / f"Class{k}" / "Train"
        folder.mkdir(parents=True)
        image.save(folder / "original.png")
        for name in ("hflip", "jpeg60", "crop5", "annotated"):
            copies(image)[name].save(folder / f"{name}.png")
    for k, other in enumerate(others):
        (root / f"Class{k}" / "Test").mkdir(parents=True)
        Image.open(other).convert("RGB").save(root / f"Class{k}" / "Test" / "other.png")
    return root


def test_real_copies_are_close_in_embedding_and_unrelated_ones_are_not(real_copies: Path):
    features = extract_features(scan_folder(real_copies), embed=True, batch_size=4)  # 12 images: a partial batch too
    assert features.embeddings.shape == (12, 1280)
    assert np.allclose(np.linalg.norm(features.embeddings, axis=1), 1.0, atol=1e-4)
    cosine = cosine_matrix(features.embeddings, 12)
    hash_d = hash_distance_matrix(features.hashes)
    names = [f"{s.path.parent.parent.name}/{s.path.stem}" for s in features.samples]
    groups = connected_groups(12, near_duplicate_pairs(hash_d, cosine, features.exact, DEFAULT_HASH_THRESHOLD, DEFAULT_COSINE_THRESHOLD))
    as_names = sorted(sorted(names[i] for i in g) for g in groups)
    assert as_names == [
        ["Class0/annotated", "Class0/crop5", "Class0/hflip", "Class0/jpeg60", "Class0/original"],
        ["Class0/other"],
        ["Class1/annotated", "Class1/crop5", "Class1/hflip", "Class1/jpeg60", "Class1/original"],
        ["Class1/other"],
    ], (np.round(cosine, 3), hash_d)
    flipped = names.index("Class0/hflip"), names.index("Class0/original")
    assert cosine[flipped] > 0.99  # the embedding averages each image with its mirror image


# --- leak-free splits ---------------------------------------------------------------------------------


def synthetic_groups(seed: int = 0) -> tuple[list[Sample], list[list[int]]]:
    """3 classes x 60 Train images in groups of 1-4, 10 Test images per class, some of them copies of Train."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    groups: list[list[int]] = []
    for label in ("A", "B", "C"):
        count = 0
        while count < 60:
            size = min(int(rng.integers(1, 5)), 60 - count)
            group = list(range(len(samples), len(samples) + size))
            samples += [Sample(Path(f"{label}/Train/{count + k}.jpg"), label, "train") for k in range(size)]
            count += size
            groups.append(group)
        for k in range(10):
            samples.append(Sample(Path(f"{label}/Test/{k}.jpg"), label, "test"))
            if k < 4:  # a near-copy of a Train image: must come out as test_leaked
                groups[-1 - k].append(len(samples) - 1)
            else:
                groups.append([len(samples) - 1])
    return samples, groups


def test_grouped_splits_keep_groups_whole_and_separate_leaked_test_images():
    samples, groups = synthetic_groups()
    split = grouped_splits(samples, groups, val_fraction=0.2, seed=7)
    assert len(split) == len(samples)
    for group in groups:
        train_side = {split[samples[i].path] for i in group if samples[i].split == "train"}
        assert len(train_side) <= 1, group
        for i in group:
            if samples[i].split == "test":
                assert split[samples[i].path] == ("test_leaked" if train_side else "clean_test")
    counts = Counter(split.values())
    assert counts["test_leaked"] == 12 and counts["clean_test"] == 18
    for label in ("A", "B", "C"):
        n_val = sum(split[s.path] == "validation" for s in samples if s.label == label)
        assert 9 <= n_val <= 15, (label, n_val)  # 20% of 60, give or take one group


def test_grouped_splits_are_deterministic_for_a_seed():
    samples, groups = synthetic_groups()
    assert grouped_splits(samples, groups, 0.2, seed=1) == grouped_splits(samples, groups, 0.2, seed=1)
    assert grouped_splits(samples, groups, 0.2, seed=1) != grouped_splits(samples, groups, 0.2, seed=2)


def test_grouped_splits_reject_a_bad_fraction_and_missing_groups():
    samples, groups = synthetic_groups()
    with pytest.raises(ValueError, match="--val_fraction"):
        grouped_splits(samples, groups, val_fraction=1.5)
    with pytest.raises(ValueError, match="groups must cover"):
        grouped_splits(samples, groups[1:], val_fraction=0.2)


def test_grouped_folds_are_stratified_and_never_split_a_group():
    samples, groups = synthetic_groups()
    folds = grouped_folds(samples, groups, k=4, seed=3)
    train = [s for s in samples if s.split == "train"]
    assert set(folds) == {s.path for s in train} and set(folds.values()) == {0, 1, 2, 3}
    for group in groups:
        assert len({folds[samples[i].path] for i in group if samples[i].split == "train"}) <= 1
    for fold in range(4):
        per_class = Counter(s.label for s in train if folds[s.path] == fold)
        assert all(10 <= per_class[label] <= 20 for label in "ABC"), per_class
    assert folds == grouped_folds(samples, groups, k=4, seed=3)
    with pytest.raises(ValueError, match="--folds"):
        grouped_folds(samples, groups, k=1)


# --- the CLI on a tiny synthetic dataset ------------------------------------------------------------


def make_dataset(root: Path) -> Path:
    """Kaggle layout, 3 classes x 4 Train + 1 Test, with planted duplicates:

    * an exact byte copy inside Train (Alpha),
    * a flipped, re-encoded copy of an Alpha Train image in Alpha/Test (a leak),
    * a rotated copy of a Beta Train image filed under Gamma/Train (conflicting labels).
    """
    seed = 100
    for name in ("Alpha fracture", "Beta fracture", "Gamma fracture"):
        for split, n in (("Train", 4), ("Test", 1)):
            (root / name / split).mkdir(parents=True)
            for i in range(n):
                seed += 1
                distinct_image(seed).save(root / name / split / f"{i}.png")
    alpha = root / "Alpha fracture"
    (alpha / "Train" / "0_copy.png").write_bytes((alpha / "Train" / "0.png").read_bytes())
    reencode(ImageOps.mirror(Image.open(alpha / "Train" / "1.png").convert("RGB"))).save(alpha / "Test" / "leak.jpg")
    Image.open(root / "Beta fracture" / "Train" / "2.png").rotate(90, expand=True).save(root / "Gamma fracture" / "Train" / "rotated.png")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_cli(root: Path, out: Path, manifest: Path, *extra: str) -> dict:
    return main(["--data_dir", str(root), "--out_dir", str(out), "--manifest", str(manifest), "--embeddings", "false", "--val_fraction", "0.25", *extra])


def test_cli_reports_duplicates_leaks_conflicts_and_writes_a_grouped_manifest(tmp_path: Path):
    root = make_dataset(tmp_path / "data")
    out, manifest = tmp_path / "report", tmp_path / "splits" / "manifest.csv"
    run_cli(root, out, manifest)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 18
    assert summary["exact_duplicate_groups"] == 1
    assert summary["duplicate_groups"] == 3 and summary["near_duplicate_pairs"] == 3
    assert summary["test_images_with_copy_in_train"] == 1 and summary["test_images_clean"] == 3
    assert summary["conflicting_label_groups"] == 1
    assert summary["thresholds"] == {"hash_distance_max": DEFAULT_HASH_THRESHOLD, "cosine_min": None}

    pairs = {(p["path_a"], p["path_b"]): p for p in read_csv(out / "pairs.csv")}
    assert pairs[("Alpha fracture/Train/0.png", "Alpha fracture/Train/0_copy.png")]["kind"] == "exact"
    leak = pairs[("Alpha fracture/Test/leak.jpg", "Alpha fracture/Train/1.png")]
    assert (leak["split_a"], leak["split_b"], leak["kind"], leak["cosine"]) == ("test", "train", "hash", "")
    assert int(leak["hash_distance"]) <= DEFAULT_HASH_THRESHOLD
    conflict = pairs[("Beta fracture/Train/2.png", "Gamma fracture/Train/rotated.png")]
    assert (conflict["label_a"], conflict["label_b"], conflict["hash_distance"]) == ("Beta", "Gamma", "0")

    groups = json.loads((out / "groups.json").read_text())
    assert [(g["conflict"], g["leak"]) for g in groups] == [(True, False), (False, True), (False, False)]
    assert groups[0]["labels"] == ["Beta", "Gamma"]

    rows = {r["path"]: r for r in read_csv(manifest)}
    assert len(rows) == 18 and list(read_csv(manifest)[0]) == ["path", "label", "split", "group"]
    assert rows["Alpha fracture/Test/leak.jpg"]["split"] == "test_leaked"
    assert {rows[f"{c} fracture/Test/0.png"]["split"] for c in ("Alpha", "Beta", "Gamma")} == {"clean_test"}
    assert rows["Alpha fracture/Train/0.png"]["split"] == rows["Alpha fracture/Train/0_copy.png"]["split"]
    assert rows["Beta fracture/Train/2.png"]["split"] == rows["Gamma fracture/Train/rotated.png"]["split"]
    assert rows["Beta fracture/Train/2.png"]["group"] == rows["Gamma fracture/Train/rotated.png"]["group"]
    assert {r["split"] for r in rows.values()} == {"train", "validation", "clean_test", "test_leaked"}
    assert summary["grouped_splits"]["test_leaked"] == {"Alpha": 1}

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 200 and sheet.height > 3 * 112  # one row per duplicate group


def test_cli_manifest_is_identical_for_the_same_seed(tmp_path: Path):
    root = make_dataset(tmp_path / "data")
    first, second, other = (tmp_path / f"{name}.csv" for name in ("first", "second", "other"))
    run_cli(root, tmp_path / "r1", first, "--seed", "3")
    run_cli(root, tmp_path / "r2", second, "--seed", "3", "--max_sheet_rows", "0")
    assert first.read_bytes() == second.read_bytes()
    assert not (tmp_path / "r2" / "contact_sheet.png").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--hash_threshold", "65"), ("--cosine_threshold", "1.5"), ("--val_fraction", "0"), ("--batch_size", "0")],
)
def test_cli_rejects_bad_flags_by_name(tmp_path: Path, flag: str, value: str):
    with pytest.raises(ValueError, match=flag):
        main(["--data_dir", str(tmp_path), flag, value])


def test_cli_names_a_missing_data_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="--data_dir"):
        main(["--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out"), "--manifest", str(tmp_path / "m.csv")])
