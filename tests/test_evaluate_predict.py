"""The evaluation CLI's report and the predict CLI's rows are checked for content."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonebreak.commands import evaluate as evaluation
from bonebreak.commands import predict
from bonebreak.evaluation.metrics import classification_metrics
from conftest import REPO, SHIPPED_MODEL, write_image


def test_metrics_on_a_known_case():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    metrics = classification_metrics(np.array([0, 1, 1, 1]), probs, ["a", "b", "c"])
    assert metrics["accuracy"] == 0.5
    assert metrics["top3_accuracy"] == 1.0
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert metrics["per_class"]["b"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": 0.5, "support": 3}
    assert metrics["macro_recall"] == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_n():
    from bonebreak.evaluation.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)
    def case(n):
        labels = rng.integers(0, 4, n)
        probs = rng.random((n, 4))
        probs[np.arange(n)[: n // 2], labels[: n // 2]] += 2  # half are right by construction
        return labels, probs / probs.sum(1, keepdims=True)
    small, large = case(140), case(5000)
    ci_small, ci_large = bootstrap_intervals(*small, n_resamples=300), bootstrap_intervals(*large, n_resamples=300)
    acc_small = float(np.mean(small[1].argmax(1) == small[0]))
    assert ci_small["accuracy"][0] < acc_small < ci_small["accuracy"][1]
    assert 0.08 < ci_small["accuracy"][1] - ci_small["accuracy"][0] < 0.25  # about +-8 points at n=140
    assert ci_large["accuracy"][1] - ci_large["accuracy"][0] < 0.04
    assert bootstrap_intervals(*small, n_resamples=300, seed=5) == bootstrap_intervals(*small, n_resamples=300, seed=5)


def test_evaluate_cli_writes_a_consistent_report(trained_vit, handful, tmp_path, capsys):
    out = tmp_path / "report"
    metrics = evaluation.main(["--model_path", str(trained_vit), "--data_dir", str(handful), "--split", "test", "--report_dir", str(out)])
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "macro_f1" in printed and "No near-duplicate audit describes this data folder" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 10 and saved["split"] == "test"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 10
    assert saved["accuracy"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in rows]))
    matrix = np.array(json.loads((out / "confusion_matrix.json").read_text())["rows_true_cols_predicted"])
    assert matrix.sum() == 10 and np.trace(matrix) == round(saved["accuracy"] * 10)
    assert all(v["support"] == 1 for v in saved["per_class"].values())
    assert saved["top3_accuracy"] >= saved["accuracy"]
    assert len(list(csv.DictReader(open(out / "per_class.csv")))) == 10
    assert (out / "confusion_matrix.png").stat().st_size > 10_000
    assert metrics["macro_f1"] == saved["macro_f1"]
    assert not (out / "ood.json").exists()  # renamed in 0.6
    xray_check = json.loads((out / "xray_check.json").read_text())
    assert xray_check["n_xrays"] == 10 and xray_check["n_photos"] >= 15 and 0.0 <= xray_check["auroc_photos_vs_xrays"] <= 1.0
    assert "X-ray check: AUROC" in printed
    low, high = saved["ci95"]["accuracy"]
    assert low <= saved["accuracy"] <= high and "95% CI" in printed


def test_evaluate_cli_rejects_bad_split(trained_vit):
    with pytest.raises(ValueError, match="--split"):
        evaluation.main(["--model_path", str(trained_vit), "--split", "dev"])


def test_predict_cli_formats_and_error_rows(trained_vit, handful, tmp_path, capsys):
    folder = tmp_path / "inbox"
    write_image(folder / "good.png", 1)
    (folder / "bad.jpg").write_text("not an image")
    real = next((handful / "Spiral Fracture" / "Test").iterdir())
    code = predict.main(["--model_path", str(trained_vit), "--format", "json", str(folder), str(real), str(tmp_path / "missing.png")])
    assert code == 0
    rows = {r["path"].split("/")[-1]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"bad.jpg", "good.png", real.name, "missing.png"}
    assert "not a supported image" in rows["bad.jpg"]["error"] and "not found" in rows["missing.png"]["error"]
    good = rows[real.name]["predictions"]
    assert len(good) == 3 and good[0]["probability"] >= good[1]["probability"] >= good[2]["probability"]
    assert rows[real.name]["xray_check"] in ("passed", "failed")  # the run fitted an X-ray check: its verdict is reported

    assert predict.main(["--model_path", str(trained_vit), "--format", "csv", "--top_k", "2", str(folder)]) == 0
    lines = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert lines[0] == ["path", "status", "label1", "probability1", "label2", "probability2", "unsure", "xray_check", "error"]
    assert [row[1] for row in lines[1:]] == ["error", "ok"]

    assert predict.main(["--model_path", str(trained_vit), str(folder / "good.png")]) == 0
    assert "%" in capsys.readouterr().out


def test_predict_cli_exit_codes(trained_vit, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "bonebreak", "predict", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    missing = run("--model_path", str(trained_vit), str(tmp_path / "nothing.png"))
    assert missing.returncode == 2 and "none of the given paths exist" in missing.stderr
    write_image(tmp_path / "x.png", 3)
    no_model = run("--model_path", str(tmp_path / "no_model"), str(tmp_path / "x.png"))
    assert no_model.returncode == 1 and "checkpoint folder" in no_model.stderr
    bad_flag = run("--format", "xml", str(tmp_path / "x.png"))
    assert bad_flag.returncode != 0 and "--format" in bad_flag.stderr


def test_predict_runs_the_xray_check_on_the_shipped_model(tmp_path, capsys):
    """`bonebreak predict` says whether each image passed the X-ray check: a photo fails it, an X-ray passes."""
    from bonebreak.evaluation.xray_check_quality import natural_photos

    photos = natural_photos()
    for name, photo in photos[:3]:
        photo.convert("RGB").save(tmp_path / f"{name}.jpg")
    xrays = [REPO / "examples" / name for name in ("spiral_fracture.jpg", "greenstick_fracture.jpg", "avulsion_fracture.jpg")]
    assert predict.main(["--model_path", str(SHIPPED_MODEL), "--format", "json", str(tmp_path), *map(str, xrays)]) == 0
    rows = {Path(row["path"]).name: row for row in json.loads(capsys.readouterr().out)}
    assert len(rows) == 6 and all(row["error"] is None and len(row["predictions"]) == 3 for row in rows.values())
    for name, _ in photos[:3]:
        assert rows[f"{name}.jpg"]["xray_check"] == "failed", name
    for xray in xrays:
        assert rows[xray.name]["xray_check"] == "passed", xray.name


def test_evaluate_all_splits_side_by_side_with_cv(trained_vit, handful, tmp_path, capsys):
    cv = {"folds": 5, "per_fold": [{"n_validation": 6}] * 5,
          "mean": {"accuracy": 0.31, "macro_f1": 0.29, "top3_accuracy": 0.6}, "std": {"accuracy": 0.04, "macro_f1": 0.05, "top3_accuracy": 0.03}}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    reports = evaluation.main(["--model_path", str(trained_vit), "--data_dir", str(handful), "--split", "all",
                               "--report_dir", str(tmp_path / "all"), "--cv_report", str(tmp_path / "cv.json")])
    assert set(reports) == {"validation", "test"}  # no manifest for this folder, so no clean_test
    table = (tmp_path / "all" / "comparison.md").read_text().splitlines()
    assert table[0] == "| split | n | accuracy | macro-F1 | top-3 accuracy |"
    test = reports["test"]
    assert f"| test split (not audited for near-duplicates of train) | 10 | {test['accuracy']:.3f} ({test['ci95']['accuracy'][0]:.3f}-" in table[3]
    assert table[4] == "| grouped 5-fold CV over Train (mean +- std of folds) | 30 | 0.310 +- 0.040 | 0.290 +- 0.050 | 0.600 +- 0.030 |"
    assert (tmp_path / "all" / "test" / "confusion_matrix.png").is_file()
    assert set(test["ci95"]) >= {"accuracy", "macro_f1", "weighted_f1", "macro_precision", "top3_accuracy"}


def test_the_leak_is_claimed_only_where_the_audit_found_it():
    from bonebreak.common.notices import CLEAN_TEST as CLEAN_NOTE
    from bonebreak.common.notices import LEAKAGE as LEAKAGE_NOTE
    from bonebreak.common.notices import UNAUDITED as UNAUDITED_NOTE
    from bonebreak.evaluation.reports import comparison_table, split_note

    audited = {"train": 1, "validation": 1, "test": 1, "clean_test": 1}  # the shipped manifest matched: bone-break itself
    assert split_note("test", audited) == LEAKAGE_NOTE and split_note("clean_test", audited) == CLEAN_NOTE
    assert split_note("test", {"train": 1, "validation": 1, "test": 1}) == UNAUDITED_NOTE  # a user's own folder
    assert split_note("validation", audited) is None
    row = {"n": 5, "accuracy": 0.4, "macro_f1": 0.3, "top3_accuracy": 0.8}
    assert "| published Test split (leaks" in comparison_table({"test": {**row, "note": LEAKAGE_NOTE}})
    assert "| test split (not audited" in comparison_table({"test": {**row, "note": UNAUDITED_NOTE}})
