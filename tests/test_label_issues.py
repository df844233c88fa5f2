"""Label-issue finder, --exclude_file / --relabel_file, and the paired CV selection protocol."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_manifest

from bonebreak.commands import label_issues
from bonebreak.commands.train import main
from bonebreak.data.loading import image_paths, load_splits
from bonebreak.data.training_edits import edit_training_split
from bonebreak.lab.label_issues import score_labels
from bonebreak.lab.protocol import paired_gain
from bonebreak.lab.results_table import METRICS, latest_per_seed, paired_table, write_table


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_confident_learning_finds_planted_label_errors():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    truth = np.repeat([0, 1, 2], 40)
    probs = rng.dirichlet([1, 1, 1], size=len(truth)) * 0.3
    probs[np.arange(len(truth)), truth] += 0.7  # the models agree with the true class
    given = truth.copy()
    planted = [3, 50, 97, 110]
    given[planted] = (truth[planted] + 1) % 3  # four images carry a wrong label
    flagged, quality = score_labels([labels[i] for i in given], probs, labels)
    found = set(np.flatnonzero(flagged))
    assert found <= set(planted) and len(found) >= 3  # no false alarm; cleanlab prunes by estimated noise rate, so may keep one
    assert set(np.argsort(quality)[: len(planted)]) == set(planted)  # the planted ones rank lowest


def test_confident_learning_needs_every_class():
    with pytest.raises(ValueError, match=r"no image is labelled \['c'\]"):
        score_labels(["a", "b"], np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), ["a", "b", "c"])


def test_paired_gain_sees_a_small_consistent_gain_that_the_spread_hides():
    base = [{"recipe": "baseline", "seed": s, "cv": {"per_fold": [{"seed": s, "fold": f, "macro_f1": 0.3 + 0.05 * f} for f in range(5)]}}
            for s in (42, 43)]
    better = [{"recipe": "r", "seed": s, "cv": {"per_fold": [{"seed": s, "fold": f, "macro_f1": 0.32 + 0.05 * f + 0.002 * (s - 42)}
                                                            for f in range(5)]}} for s in (42, 43)]
    gain = paired_gain(base, better, "macro_f1")
    assert gain["pairs"] == 10 and gain["seeds"] == [42, 43]
    assert gain["gain"] == pytest.approx(0.021)
    assert 0 < gain["t_interval"][0] < 0.021 < gain["t_interval"][1] and gain["adopt"]
    noisy = [{"recipe": "n", "seed": 42, "cv": {"per_fold": [{"fold": f, "macro_f1": 0.3 + 0.05 * f + (0.04 if f % 2 else -0.04)}
                                                            for f in range(5)]}}]
    assert not paired_gain(base, noisy, "macro_f1")["adopt"]  # pairs come from the record's seed when folds lack one


def test_one_seed_is_not_enough_to_adopt_however_clear_its_gain():
    base = [{"recipe": "baseline", "seed": s, "cv": {"per_fold": [{"seed": s, "fold": f, "macro_f1": 0.3 + 0.05 * f} for f in range(5)]}}
            for s in (42, 43)]
    one_seed = [{"recipe": "r", "seed": 42, "cv": {"per_fold": [{"seed": 42, "fold": f, "macro_f1": 0.35 + 0.05 * f + 0.001 * f}
                                                               for f in range(5)]}}]
    gain = paired_gain(base, one_seed, "macro_f1")
    assert gain["pairs"] == 5 and gain["t_interval"][0] > 0.04  # clearly above zero on its five pairs...
    assert not gain["adopt"] and gain["verdict"] == "not decided: 1 seed, the protocol needs 2"  # ...but one draw of folds
    two_seeds = paired_gain(base, one_seed + [{**one_seed[0], "seed": 43, "cv": {"per_fold": [
        {**fold, "seed": 43} for fold in one_seed[0]["cv"]["per_fold"]]}}], "macro_f1")
    assert two_seeds["adopt"] and two_seeds["verdict"] == "yes"


def _cv_record(recipe: str, seed: int, score: float, started: str, note: str | None = None, precision: str = "bf16") -> dict:
    return {"recipe": recipe, "seed": seed, "kind": "cv5", "note": note, "started": started, "machine": {"cpus": 2, "precision": precision},
            "cv": {"per_fold": [{"seed": seed, "fold": f, **{m: score * (i + 1) + 0.01 * f for i, m in enumerate(METRICS)}}
                                for f in range(5)]}}


def test_paired_table_uses_the_newest_run_per_seed_and_never_pairs_across_notes():
    gpu = "GPU, resized copy"
    runs = [_cv_record("baseline", 42, 0.30, "2026-11-26T10"), _cv_record("baseline", 42, 0.40, "2026-11-27T10"),  # a rerun
            _cv_record("clean", 42, 0.42, "2026-11-26T12"),
            _cv_record("baseline", 42, 0.10, "2026-11-27T11", note=gpu), _cv_record("clean", 42, 0.13, "2026-11-27T11", note=gpu)]
    assert [r["started"] for r in latest_per_seed(runs)[("cv5", None, "baseline")]] == ["2026-11-27T10"]
    rows = [line for line in paired_table(runs) if line.startswith("| clean")]
    assert len(rows) == 2
    cpu_row, gpu_row = sorted(rows, key=lambda row: gpu in row)
    # macro-F1 is METRICS[1], so its scores are twice accuracy's and its gains too: each column shows its own metric
    cells = [cell.strip() for cell in cpu_row.split("|")]
    assert cells[6:10] == ["0.860 / 0.820", "+0.040 [+0.040, +0.040] (+0.040, +0.040)", "+0.020 [+0.020, +0.020]",
                           "+0.060 [+0.060, +0.060]"]  # against the rerun, not the older 0.30 baseline
    assert gpu in gpu_row and "0.280 / 0.220" in gpu_row and "+0.060 [+0.060, +0.060] (+" in gpu_row


def test_pairs_are_formed_only_between_runs_trained_in_the_same_precision():
    """--precision auto trains in bf16 or fp32 depending on the CPU: an fp32 seed pairs with that seed's fp32 baseline."""
    runs = [_cv_record("baseline", 42, 0.30, "2026-11-26T10"), _cv_record("baseline", 43, 0.30, "2026-11-26T11"),
            _cv_record("baseline", 43, 0.20, "2026-11-27T10", precision="fp32"),  # not a rerun of the bf16 one: both stay
            _cv_record("r", 42, 0.31, "2026-11-27T11"), _cv_record("r", 43, 0.22, "2026-11-27T12", precision="fp32"),
            _cv_record("fp16_only", 42, 0.50, "2026-11-27T13", precision="fp16")]
    assert len(latest_per_seed(runs)[("cv5", None, "baseline")]) == 3
    gain = paired_gain(latest_per_seed(runs)[("cv5", None, "baseline")], latest_per_seed(runs)[("cv5", None, "r")], "accuracy")
    # 42: 0.31 - 0.30 (bf16), 43: 0.22 - 0.20 (fp32); against the bf16 baseline of 43 it would have been -0.08
    assert gain["pairs"] == 10 and gain["gain"] == pytest.approx(0.015) and gain["precisions"] == {42: ["bf16"], 43: ["fp32"]}
    rows = [line for line in paired_table(runs) if line.startswith("| ")]
    assert any("| 42 (bf16), 43 (fp32) | 10 |" in row for row in rows)
    assert not any(row.startswith("| fp16_only") for row in rows)  # no fp16 baseline: nothing to pair with


def test_the_table_comes_with_a_forest_plot_of_the_paired_gains(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    records = [_cv_record("baseline", 42, 0.30, "2026-11-27T10"), _cv_record("clean", 42, 0.33, "2026-11-27T11")]
    for number, record in enumerate(records):
        scores = record["cv"]["per_fold"]
        record["cv"].update(mean={m: float(np.mean([f[m] for f in scores])) for m in METRICS},
                            std={m: float(np.std([f[m] for f in scores])) for m in METRICS})
        record.update(machine={"cpus": 2}, wall_seconds=60.0, commit="abc1234")
        (results / f"{number}.json").write_text(json.dumps(record))
    exp = SimpleNamespace(results_dir=str(results), table_path=str(tmp_path / "docs" / "table.md"))
    table = write_table(exp).read_text()
    figure = tmp_path / "docs" / "table_protocol.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](table_protocol.png)" in table and "not decided: 1 seed" in table
    (results / "1.json").unlink()  # nothing to pair: no figure, no reference to one
    figure.unlink()
    assert "protocol.png" not in write_table(exp).read_text() and not figure.exists()


def test_exclude_and_relabel_touch_training_images_only(handful, tmp_path):
    manifest = write_manifest(handful, tmp_path / "manifest.csv")
    data = load_splits(handful, split_manifest=manifest)
    train = image_paths(data.splits["train"])
    test = image_paths(data.splits["clean_test"])
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("path,note\n" + "".join(f"{Path(p).relative_to(handful).as_posix()},x\n" for p in train[:3]) + f"{test[0]},abs\n")
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"path,label\n{train[5]},{data.labels[0]}\n{test[1]},{data.labels[0]}\n")
    edited, record = edit_training_split(data, seed=1, exclude_file=str(exclude), relabel_file=str(relabel))
    assert len(edited.splits["train"]) == len(train) - 3 and record["exclude_file"]["excluded_from_train"] == 3
    assert image_paths(edited.splits["clean_test"]) == test  # listed Test images stay, with their labels
    assert edited.splits["clean_test"]["label"] == data.splits["clean_test"]["label"]
    new_labels = dict(zip(image_paths(edited.splits["train"]), edited.splits["train"]["label"]))
    assert new_labels[train[5]] == 0 and record["relabel_file"]["relabelled_in_train"] == int(data.splits["train"]["label"][5] != 0)
    assert edited.training_edits == record and record["exclude_file"]["sha256"]

    (tmp_path / "typo.csv").write_text("path\nAvulsion fracture/Train/missing.jpg\n")
    with pytest.raises(ValueError, match=r"--exclude_file: 1 path\(s\) are not images of"):
        edit_training_split(data, seed=1, exclude_file=str(tmp_path / "typo.csv"))
    (tmp_path / "bad.csv").write_text(f"path,label\n{train[0]},Broken Arm\n")
    with pytest.raises(ValueError, match=r"--relabel_file .*unknown label\(s\) \['Broken Arm'\]"):
        edit_training_split(data, seed=1, relabel_file=str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="needs a 'path' column"):
        (tmp_path / "nopath.csv").write_text("file\nx\n")
        edit_training_split(data, seed=1, exclude_file=str(tmp_path / "nopath.csv"))


def test_cv_with_exclusions_scores_every_image_then_label_issues_reports(handful, tiny_vit, tmp_path):
    manifest = write_manifest(handful, tmp_path / "manifest.csv")
    lines = manifest.read_text().splitlines()
    # put the first Train image of the second class into the group of the first class's Train images: a conflicting group
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    first, second = rows[1], next(r for r in rows if r[1] != rows[1][1] and "/Train/" in r[0])
    second[3] = first[3]
    manifest.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    data = load_splits(handful, split_manifest=manifest)
    excluded = image_paths(data.splits["train"])[:4]
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("path\n" + "\n".join(excluded) + "\n")
    out = tmp_path / "cv"
    result = main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
                   "--num_workers", "0", "--cv_folds", "3", "--split_manifest", str(manifest), "--exclude_file", str(exclude),
                   "--no_export_onnx"])
    assert sum(f["n_validation"] for f in result["per_fold"]) == 30  # excluded images are still scored, as labelled
    assert sum(f["n_train"] for f in result["per_fold"]) == 2 * 30 - 2 * 4  # ...but never trained on
    fold_edits = [json.loads((out / f"fold{k}" / "metrics.json").read_text())["training_edits"] for k in range(3)]
    assert sum(e["exclude_file"]["excluded_from_train"] for e in fold_edits) == 2 * 4  # recorded in each checkpoint...
    assert all("Left out of training" in (out / f"fold{k}" / "README.md").read_text() for k in range(3))  # ...and its model card
    oof = rows_of(out / "oof_probabilities.csv")
    assert len(oof) == 30 and {r["path"] for r in oof} >= set(excluded)
    assert all(abs(sum(float(r[label]) for label in data.labels) - 1) < 1e-4 for r in oof)

    stamps = {k: (out / f"fold{k}" / "model.safetensors").stat().st_mtime_ns for k in range(3)}
    (out / "fold2" / "eval_validation" / "probabilities.csv").unlink()  # fold 2 as if interrupted before it finished
    again = main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out),
                  "--num_workers", "0", "--cv_folds", "3", "--split_manifest", str(manifest), "--exclude_file", str(exclude),
                  "--no_export_onnx", "--resume"])
    assert [(out / f"fold{k}" / "model.safetensors").stat().st_mtime_ns == stamps[k] for k in range(3)] == [True, True, False]
    assert again["per_fold"][:2] == result["per_fold"][:2] and len(rows_of(out / "oof_probabilities.csv")) == 30
    report = tmp_path / "report"
    # the folder named another way than in the CV run (relative, not absolute): the same images
    summary = label_issues.main(["--cv_dir", str(out), "--data_dir", os.path.relpath(handful), "--split_manifest", str(manifest),
                                 "--out_dir", str(report)])
    issues = rows_of(report / "label_issues.csv")
    assert len(issues) == 30 + 10 and {r["split"] for r in issues} == {"train", "clean_test"}
    assert [float(r["label_quality"]) for r in issues] == sorted(float(r["label_quality"]) for r in issues)
    conflicted = {r["path"] for r in issues if r["conflicting_group"] == "True"}
    assert {first[0], second[0]} <= conflicted
    assert summary["train"]["in_conflicting_groups"] == sum(1 for r in issues if r["conflicting_group"] == "True" and r["split"] == "train")
    flagged_train = [r["path"] for r in issues if r["split"] == "train" and r["flagged_by_cleanlab"] == "True"]
    assert [r["path"] for r in rows_of(report / "exclude_cleanlab.csv")] == flagged_train
    assert summary["train"]["flagged_by_cleanlab"] == len(flagged_train)
    strict = [r["path"] for r in issues if r["split"] == "train" and r["flagged_by_cleanlab"] == "True" and float(r["suggested_probability"]) >= 0.5]
    assert [r["path"] for r in rows_of(report / "exclude_cleanlab_confident.csv")] == strict == [r["path"] for r in rows_of(report / "relabel_cleanlab.csv")]
    assert summary["train"]["flagged_confidently"] == len(strict) and summary["min_probability"] == 0.5
    assert {r["path"] for r in rows_of(report / "exclude_conflicting_groups.csv")} == {p for p in conflicted if "/Train/" in p}
    assert json.loads((report / "summary.json").read_text())["clean_test"]["images"] == 10
    assert "clean_test" in (report / "summary.md").read_text()
    if flagged_train:
        assert (report / "contact_sheet.png").is_file()
    # the files it writes are what training reads
    edited, record = edit_training_split(data, seed=1, exclude_file=str(report / "exclude_conflicting_groups.csv"),
                                         relabel_file=str(report / "relabel_cleanlab.csv"))
    assert record["exclude_file"]["excluded_from_train"] + len(edited.splits["train"]) == len(data.splits["train"])


def test_label_issues_needs_a_cv_run(tmp_path):
    with pytest.raises(ValueError, match="--min_probability must be in"):
        label_issues.main(["--cv_dir", str(tmp_path), "--data_dir", "tests/fixtures/bone-break-mini", "--split_manifest", "none",
                           "--min_probability", "0"])
    with pytest.raises(ValueError, match="--cv_dir is required"):
        label_issues.main(["--out_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="no oof_probabilities.csv"):
        label_issues.main(["--cv_dir", str(tmp_path), "--data_dir", "tests/fixtures/bone-break-mini", "--split_manifest", "none"])
