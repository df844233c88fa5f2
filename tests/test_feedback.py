"""Visitors' feedback, fast: the bounded store (serving/feedback.py), the flag handler and page of the app, the review
that turns flags into training images (`bonebreak feedback`), and ``--extra_train_dir`` (train split only).
The real server, gradio_client and a training run on the result: tests/test_feedback_flow.py."""

from __future__ import annotations

import csv
import json
import re
import shutil
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import bonebreak.serving.feedback as feedback
from bonebreak.commands import run
from bonebreak.data.loading import image_paths, load_splits
from bonebreak.data.training_edits import edit_training_split
from bonebreak.serving.feedback import (NOT_XRAY, RIGHT, WRONG, FeedbackFull, FeedbackStore, InvalidFeedback, apply_review,
                                        write_review)
from bonebreak.serving.loader import load_classifier
from bonebreak.serving.ui import FEEDBACK_NOTICE, FeedbackHandler, build_demo
from conftest import REPO, SHIPPED_MODEL, synthetic_xray, write_image

LABELS = ["Avulsion", "Greenstick", "Spiral"]
NAME = re.compile(r"^[0-9a-f]{32}\.png$")


@pytest.fixture(scope="module")
def predictor():
    return load_classifier(SHIPPED_MODEL, backend="onnx")  # ONNX Runtime alone, as a Space serves it


def store(folder: Path, **bounds) -> FeedbackStore:
    return FeedbackStore(folder, "model-a", LABELS, clock=lambda: "2026-12-06T10:00:00Z", **bounds)


def flags(folder: Path) -> list[dict[str, str]]:
    with open(folder / "feedback.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_flag_is_the_decoded_upload_named_by_its_hash_and_one_row(predictor, tmp_path):
    upload = tmp_path / "up" / "..;rm -rf $HOME & x.jpg"  # a visitor's file name is never used
    upload.parent.mkdir()
    shutil.copy(REPO / "examples" / "spiral_fracture.jpg", upload)
    folder = tmp_path / "flags"
    handler = FeedbackHandler(predictor, FeedbackStore(folder, "bone_break_model", predictor.labels))
    other = next(label for label in predictor.labels if label != predictor.analyse(str(upload)).prediction.top_label)
    assert handler(str(upload), WRONG, other).startswith("Thank you")
    assert handler(str(upload), RIGHT, None).startswith("Thank you")
    rows = flags(folder)
    assert [(r["verdict"], r["visitor_type"]) for r in rows] == [(WRONG, other), (RIGHT, "")]
    assert rows[0]["image"] == rows[1]["image"] and rows[0]["model"] == "bone_break_model" and rows[0]["xray_check"] == "passed"
    assert rows[0]["time_utc"].endswith("Z") and 0 < float(rows[0]["probability"]) <= 1 and rows[0]["predicted"] in predictor.labels
    assert sorted(p.name for p in folder.iterdir()) == ["feedback.csv", "images"]
    (stored,) = (folder / "images").iterdir()
    assert NAME.match(stored.name) and rows[0]["image"] == f"images/{stored.name}"
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(predictor.load(str(upload))))  # what the model read
    pasted = tmp_path / "pasted.png"
    synthetic_xray(3, size=(300, 240)).save(pasted)
    handler(str(upload), NOT_XRAY, None, pasted=str(pasted))  # the page's pasted image wins over the upload box
    assert len(list((folder / "images").iterdir())) == 2 and flags(folder)[2]["verdict"] == NOT_XRAY


def test_invalid_verdict_or_type_is_refused_and_nothing_is_stored(predictor, tmp_path):
    folder = tmp_path / "flags"
    handler = FeedbackHandler(predictor, FeedbackStore(folder, "m", predictor.labels))
    example = str(REPO / "examples" / "spiral_fracture.jpg")
    predicted = predictor.analyse(example).prediction.top_label
    for verdict, kind, says in [("../../etc", None, "Choose one of"), ("Right", None, "Choose one of"), (None, None, "Choose one of"),
                                (WRONG, None, "right fracture type"), (WRONG, "../Spiral", "Unknown fracture type"),
                                (RIGHT, "images/x.png", "Unknown fracture type"), (WRONG, predicted, "pick the type")]:
        with pytest.raises(gr.Error, match=says):
            handler(example, verdict, kind)
    with pytest.raises(gr.Error, match="Upload the X-ray"):
        handler(None, RIGHT, None)
    assert not folder.exists()
    with pytest.raises(InvalidFeedback):
        store(tmp_path / "direct").record(synthetic_xray(1), "Spiral", 0.5, "wrong", "Spiral/../..")
    assert not (tmp_path / "direct").exists()


def test_the_folder_is_bounded_by_count_and_says_so_in_the_page(predictor, tmp_path, recwarn):
    by_count = store(tmp_path / "count", max_flags=2)
    for seed in (1, 2):
        by_count.record(synthetic_xray(seed), "Spiral", 0.5, RIGHT, None)
    with pytest.raises(FeedbackFull, match="full"):
        by_count.record(synthetic_xray(3), "Spiral", 0.5, RIGHT, None)
    assert len(flags(tmp_path / "count")) == 2 and len(list((tmp_path / "count" / "images").iterdir())) == 2
    handler = FeedbackHandler(predictor, FeedbackStore(tmp_path / "count", "m", predictor.labels, max_flags=2))
    status = handler(str(REPO / "examples" / "spiral_fracture.jpg"), RIGHT, None)  # a message, not an error page
    assert "full" in status and "not stored" in status and len(flags(tmp_path / "count")) == 2


def test_the_folder_is_bounded_by_bytes(tmp_path):
    first = store(tmp_path / "probe")
    first.record(synthetic_xray(1), "Spiral", 0.5, RIGHT, None)
    _, one_flag = first.used()
    by_bytes = store(tmp_path / "bytes", max_bytes=one_flag + 100)
    by_bytes.record(synthetic_xray(1), "Spiral", 0.5, RIGHT, None)
    by_bytes.record(synthetic_xray(1), "Spiral", 0.5, RIGHT, None)  # the same picture again: only a row more
    with pytest.raises(FeedbackFull):
        by_bytes.record(synthetic_xray(2), "Spiral", 0.5, RIGHT, None)
    flags_kept, size = by_bytes.used()
    assert flags_kept == 2 and size <= one_flag + 100 and len(list((tmp_path / "bytes" / "images").iterdir())) == 1


def test_files_are_written_whole_even_by_concurrent_requests(tmp_path, monkeypatch):
    writes, atomic = [], []
    real_write, real_atomic = feedback.os.write, feedback.write_atomically
    def counted(fd, data):
        if data.startswith(b"time_utc,") or data.startswith(b"2026-12-06"):  # only the store's rows, not pytest's own writes
            writes.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(feedback.os, "write", counted)
    monkeypatch.setattr(feedback, "write_atomically", lambda path, data: atomic.append(path) or real_atomic(path, data))
    bounded = store(tmp_path / "flags", max_flags=5)
    full = []

    def flag(seed: int) -> None:
        try:
            bounded.record(synthetic_xray(seed), "Spiral", 0.5, WRONG, "Greenstick")
        except FeedbackFull:
            full.append(seed)

    threads = [threading.Thread(target=flag, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = flags(tmp_path / "flags")
    assert len(rows) == 5 and len(full) == 7 and len(writes) == 5 and len(atomic) == 5  # one write per row, images renamed into place
    assert writes[0].decode().startswith("time_utc,") and all(w.decode().count("\n") == 1 for w in writes[1:])
    assert sorted(f"images/{p.name}" for p in (tmp_path / "flags" / "images").iterdir()) == sorted(r["image"] for r in rows)
    assert not list((tmp_path / "flags").rglob("*.part"))


def page_text(demo: gr.Blocks) -> str:
    return " ".join(str(c.get("props", {}).get("value", "")) for c in demo.get_config_file()["components"])


def test_the_page_says_flags_are_stored_only_when_feedback_is_on(predictor, tmp_path):
    off = build_demo(predictor, examples=[])
    assert "store" not in page_text(off).lower() and "feedback" not in {d.get("api_name") for d in off.config["dependencies"]}
    on = build_demo(predictor, examples=[], feedback=FeedbackStore(tmp_path, "m", predictor.labels))
    assert FEEDBACK_NOTICE in page_text(on) and "Nothing else is stored" in FEEDBACK_NOTICE
    assert "predict" in {d.get("api_name") for d in on.config["dependencies"]}
    assert "feedback" in {d.get("api_name") for d in on.config["dependencies"]}
    assert not tmp_path.joinpath("feedback.csv").exists()  # building the page stores nothing


def flagged_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "flags"
    clock = iter(f"2026-12-06T10:00:0{i}Z" for i in range(9))
    flagging = FeedbackStore(folder, "m", LABELS, clock=lambda: next(clock))
    flagging.record(synthetic_xray(1), "Spiral", 0.8, WRONG, "Greenstick")
    flagging.record(synthetic_xray(2), "Avulsion", 0.6, RIGHT, None)
    flagging.record(synthetic_xray(3), "Spiral", 0.4, NOT_XRAY, None)
    return folder


def edit_review(path: Path, accept: dict[int, str]) -> None:
    rows = list(csv.DictReader(open(path, newline="")))
    for index, value in accept.items():
        rows[index]["accept"] = value
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_review_then_apply_writes_only_accepted_training_images(tmp_path, capsys):
    folder, out = flagged_folder(tmp_path), tmp_path / "out"
    run("feedback", ["--feedback_dir", str(folder), "--output_dir", str(out)])
    assert (out / "contact_sheet.jpg").is_file() and "review" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "review.csv", newline="")))
    assert [(r["verdict"], r["proposed_label"], r["accept"]) for r in rows] == [(WRONG, "Greenstick", ""), (RIGHT, "Avulsion", ""),
                                                                                 (NOT_XRAY, "", "")]
    with pytest.raises(SystemExit):  # nothing decided yet: refused, naming the file to edit
        run("feedback", ["--feedback_dir", str(folder), "--output_dir", str(out), "--apply"])
    assert "review.csv has no accept decisions" in capsys.readouterr().err
    edit_review(out / "review.csv", {0: "yes", 1: "no", 2: "yes"})
    run("feedback", ["--feedback_dir", str(folder), "--output_dir", str(out)])  # step 1 again keeps the decisions
    assert [r["accept"] for r in csv.DictReader(open(out / "review.csv", newline=""))] == ["yes", "no", "yes"]
    assert run("feedback", ["--feedback_dir", str(folder), "--output_dir", str(out), "--apply"]) == 0
    written = sorted(p.relative_to(out / "extra_train").as_posix() for p in (out / "extra_train").rglob("*.png"))
    assert written == [f"Greenstick/{Path(rows[0]['image']).name}"]  # the not-an-X-ray flag never, the rejected one not
    edit_review(out / "review.csv", {1: "yes", 0: "maybe"})
    with pytest.raises(ValueError, match="accept must be yes, no or empty"):
        apply_review(folder, out)
    edit_review(out / "review.csv", {0: "no"})
    assert apply_review(folder, out) == {"Avulsion": 1} and not (out / "extra_train" / "Greenstick").exists()  # written afresh
    edit_review(out / "review.csv", {1: "yes"})
    rows = list(csv.DictReader(open(out / "review.csv", newline="")))
    rows[1]["image"] = "../../secret.png"
    with open(out / "review.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="names no feedback image"):
        apply_review(folder, out)
    with pytest.raises(ValueError, match="no feedback.csv"):
        write_review(tmp_path / "nothing", out)


@pytest.fixture
def small_data(tmp_path) -> Path:
    root = tmp_path / "data"
    for i, label in enumerate(("Avulsion fracture", "Spiral Fracture")):
        for j in range(4):
            write_image(root / label / "Train" / f"{j}.png", seed=10 * i + j)
        write_image(root / label / "Test" / "t.png", seed=100 + i)
    return root


def test_extra_train_dir_adds_to_train_only_and_checks_labels(small_data, tmp_path):
    data = load_splits(small_data, split_manifest="none", val_fraction=0.25)
    extra = tmp_path / "extra"
    write_image(extra / "Spiral" / "a.png", seed=50)
    write_image(extra / "Avulsion" / "b.png", seed=51)
    (extra / "Spiral" / "broken.png").write_bytes(b"not a png")
    shutil.copy(small_data / "Spiral Fracture" / "Test" / "t.png", extra / "Spiral" / "test_copy.png")  # e.g. a flagged example
    edited, record = edit_training_split(data, seed=1, extra_train_dir=str(extra))
    assert len(edited.splits["train"]) == len(data.splits["train"]) + 2
    assert record["extra_train_dir"] == {"path": str(extra), "images": 2, "per_label": {"Avulsion": 1, "Spiral": 1}, "unreadable": 1,
                                         "copies_of_held_out": 1}
    for split in ("validation", "test"):
        assert image_paths(edited.splits[split]) == image_paths(data.splits[split])
    assert any("broken.png" in str(path) for path, _ in edited.broken)
    assert json.loads(json.dumps(edited.training_edits)) == record
    write_image(extra / "Oblique" / "c.png", seed=52)
    with pytest.raises(ValueError, match=r"--extra_train_dir .*unknown label\(s\) \['Oblique'\]"):
        edit_training_split(data, seed=1, extra_train_dir=str(extra))
