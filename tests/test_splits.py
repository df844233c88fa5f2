"""Edge cases of bonebreak.data.splits on tiny synthetic inputs: the stratified validation carve,
manifests (reading, writing, applying, "auto"), and the group quotas of the grouped splits and folds.

No image is decoded: these functions only look at paths, labels and split names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bonebreak.data.splits import (
    DEFAULT_MANIFEST,
    DatasetError,
    Sample,
    apply_manifest,
    carve_validation,
    check_fraction,
    grouped_folds,
    grouped_from_manifest,
    grouped_splits,
    manifest_path,
    read_manifest,
    read_manifest_groups,
    split_table,
    write_manifest,
)

LOGGER = "bonebreak.data.splits"


def train_samples(per_class: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"{label}/{i}.jpg"), label, "train") for label, n in per_class.items() for i in range(n)]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- check_fraction and carve_validation --------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_a_fraction_outside_zero_to_one_is_rejected_naming_the_flag(value):
    with pytest.raises(ValueError, match=rf"^invalid value for --val_fraction \({value}\)"):
        check_fraction(value)


@pytest.mark.parametrize("seed", range(8))
def test_every_class_with_two_images_gets_exactly_one_validation_image(seed, caplog):
    # 3 classes x 2 images at 50%: just enough for stratification, which must then be used.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kept, held_out = carve_validation(train_samples({"A": 2, "B": 2, "C": 2}), 0.5, seed)
    assert sorted(s.label for s in held_out) == ["A", "B", "C"]
    assert sorted(s.label for s in kept) == ["A", "B", "C"]
    assert not caplog.records  # stratified: nothing to warn about


@pytest.mark.parametrize(
    "per_class, fraction, n_validation, reason",
    [({"A": 1, "B": 4, "C": 4}, 0.3, 3, "fewer than 2 training images"),  # a class of 1 image cannot be stratified
     ({"A": 2, "B": 2, "C": 2}, 0.8, 5, "lower --val_fraction")],  # too few images would stay in train for every class
)
def test_an_unstratifiable_carve_still_splits_and_warns_why(per_class, fraction, n_validation, reason, caplog):
    train = train_samples(per_class)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kept, held_out = carve_validation(train, fraction, seed=0)
    assert len(held_out) == n_validation and len(kept) == len(train) - n_validation
    assert {s.split for s in kept} == {"train"} and {s.split for s in held_out} == {"validation"}
    assert sorted(s.path for s in kept + held_out) == sorted(s.path for s in train)
    assert ["validation split is not stratified" in r.getMessage() and reason in r.getMessage() for r in caplog.records] == [True]


# --- manifests -----------------------------------------------------------------------------------------


def test_a_manifest_needs_only_path_and_split_columns(tmp_path):
    assert read_manifest(write_csv(tmp_path / "m.csv", "path,split\nA/0.jpg,train\n")) == {"A/0.jpg": "train"}


@pytest.mark.parametrize("text", ["path,label,group\nA/0.jpg,A,0\n", "path,label,split,group\n", ""])
def test_a_csv_without_split_rows_is_not_a_manifest(tmp_path, text):
    with pytest.raises(DatasetError, match="not a split manifest"):
        read_manifest(write_csv(tmp_path / "m.csv", text))


def test_an_image_without_a_group_is_its_own_group(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "path,label,split,group\nA/0.jpg,A,train,7\nA/1.jpg,A,train,\n")
    assert read_manifest_groups(manifest, tmp_path) == {tmp_path / "A/0.jpg": "7", tmp_path / "A/1.jpg": "A/1.jpg"}


def test_written_manifest_is_sorted_lf_only_and_reads_back(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "elsewhere" / "z.jpg"  # not under root: recorded by its full path
    samples = [Sample(root / "B/1.jpg", "B", "test"), Sample(root / "A/0.jpg", "A", "train"), Sample(outside, "A", "train")]
    assignment = {root / "B/1.jpg": "clean_test", root / "A/0.jpg": "validation", outside: "train"}
    target = tmp_path / "new" / "nested" / "manifest.csv"  # parent folders do not exist yet
    assert write_manifest(samples, assignment, [2, 0, 1], root, target) == target
    # LF line endings, whatever the csv module's default: a seed must give identical bytes on every OS.
    assert target.read_bytes() == (
        f"path,label,split,group\n{outside.as_posix()},A,train,1\nA/0.jpg,A,validation,0\nB/1.jpg,B,clean_test,2\n"
    ).encode()
    assert read_manifest(target)["A/0.jpg"] == "validation"
    assert read_manifest_groups(target, root)[root / "B/1.jpg"] == "2"


def test_applying_a_manifest_that_lists_extra_files_depends_on_exact(tmp_path):
    samples = [Sample(tmp_path / "A/0.jpg", "A", "train"), Sample(tmp_path / "A/1.jpg", "A", "train")]
    fits = {"A/0.jpg": "train", "A/1.jpg": "validation"}
    assert [s.split for s in apply_manifest(samples, tmp_path, fits, exact=True)] == ["train", "validation"]
    larger = {**fits, "B/9.jpg": "clean_test"}  # describes a bigger folder
    assert [s.split for s in apply_manifest(samples, tmp_path, larger)] == ["train", "validation"]
    assert apply_manifest(samples, tmp_path, larger, exact=True) is None


@pytest.mark.parametrize("given, expected", [(None, None), ("none", None), ("None", None), ("auto", DEFAULT_MANIFEST),
                                             ("my.csv", Path("my.csv"))])
def test_manifest_path_understands_none_and_auto(given, expected):
    assert manifest_path(given) == expected


def shipped_samples(root: Path, keep=lambda i: True) -> list[Sample]:
    """Samples for the files the shipped manifest lists (no file needs to exist)."""
    return [Sample(root / relative, "?", "train") for i, relative in enumerate(sorted(read_manifest(DEFAULT_MANIFEST))) if keep(i)]


def test_auto_uses_the_shipped_manifest_for_the_folder_it_describes(tmp_path, caplog):
    shipped = read_manifest(DEFAULT_MANIFEST)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        grouped = grouped_from_manifest(shipped_samples(tmp_path), tmp_path, "auto")
    assert {s.path.relative_to(tmp_path).as_posix(): s.split for s in grouped} == shipped
    assert f"using the leak-free grouped splits of {DEFAULT_MANIFEST}" in caplog.text


def test_auto_ignores_the_shipped_manifest_for_a_folder_with_only_some_of_its_files(tmp_path, caplog):
    # A subset is a different folder (a trimmed copy): its splits would no longer be the audited ones.
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert grouped_from_manifest(shipped_samples(tmp_path, keep=lambda i: i % 2 == 0), tmp_path, "auto") is None
    assert f"{DEFAULT_MANIFEST} does not describe {tmp_path}" in caplog.text


def test_an_explicit_manifest_may_list_more_files_than_the_folder_has(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "path,split\nA/0.jpg,validation\nA/1.jpg,train\n")
    grouped = grouped_from_manifest([Sample(tmp_path / "A/0.jpg", "A", "train")], tmp_path, manifest)
    assert [s.split for s in grouped] == ["validation"]


# --- grouped splits, folds and their table ----------------------------------------------------------------


def train_groups(*groups: str) -> tuple[list[Sample], list[list[int]]]:
    """Train samples in the given groups, one letter per image's label: ("BBA", "A") is 3 + 1 images."""
    samples = [Sample(Path(f"{g}/{k}.jpg"), label, "train") for g, labels in enumerate(groups) for k, label in enumerate(labels)]
    starts = [sum(map(len, groups[:g])) for g in range(len(groups))]
    return samples, [list(range(start, start + len(labels))) for start, labels in zip(starts, groups)]


@pytest.mark.parametrize(
    "groups, fraction, validation_groups",
    [
        # Each case has one candidate group; the other is too big to ever fit, so the visiting order is irrelevant.
        (("BBA", "BBBBBBBB"), 0.2, {0}),  # the group follows its majority class B (quota 2.0), not A (0.2)
        (("BA", "AAAAAAAAAA"), 0.2, {0}),  # a tie goes to the first label alphabetically: A (2.2), not B (0.2)
        (("AAA", "AAAAAAAAAA"), 0.1, set()),  # half of 3 overshoots the quota of 1.3: stays in train
        (("AA", "AAAAAA"), 0.125, {0}),  # half of 2 is exactly the quota of 1.0: joins validation
    ],
)
def test_a_group_joins_validation_while_half_of_it_fits_its_majority_class_quota(groups, fraction, validation_groups):
    samples, members = train_groups(*groups)
    split = grouped_splits(samples, members, val_fraction=fraction, seed=0)
    assert {int(path.parent.name) for path, name in split.items() if name == "validation"} == validation_groups


def test_two_folds_are_allowed_and_a_published_validation_image_gets_a_fold():
    samples = [Sample(Path("A/0.jpg"), "A", "train"), Sample(Path("A/1.jpg"), "A", "train"),
               Sample(Path("B/0.jpg"), "B", "validation"), Sample(Path("B/1.jpg"), "B", "validation"),
               Sample(Path("B/test.jpg"), "B", "test")]
    folds = grouped_folds(samples, [[0, 1], [2, 3], [4]], k=2, seed=0)  # exactly as many training groups as folds
    assert set(folds) == {Path("A/0.jpg"), Path("A/1.jpg"), Path("B/0.jpg"), Path("B/1.jpg")}
    assert folds[Path("A/0.jpg")] == folds[Path("A/1.jpg")] != folds[Path("B/0.jpg")] == folds[Path("B/1.jpg")]


def test_more_folds_than_training_groups_is_refused_with_both_numbers():
    samples, members = train_groups("AA", "B")
    with pytest.raises(ValueError, match=r"--folds 3 is more than the 2 groups of training images"):
        grouped_folds(samples, members, k=3)


def test_split_table_counts_images_per_split_and_label():
    samples, _ = train_groups("AAAB", "AA")
    assignment = {s.path: "validation" if s.path.parent.name == "1" else "train" for s in samples}
    assert split_table(samples, assignment) == {"train": {"A": 3, "B": 1}, "validation": {"A": 2}}
