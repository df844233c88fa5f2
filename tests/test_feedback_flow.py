"""Feedback that reaches training, end to end (slow): the real app with --feedback_dir on the shipped model, two flags
through gradio_client's /feedback, `bonebreak feedback` (review, a person's decisions, --apply), then a training run
with --extra_train_dir that trains on both accepted images. (The store, the review and the page without a server:
tests/test_feedback.py.)"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import httpx
import pytest

from bonebreak.commands import run
from bonebreak.data.loading import load_splits
from bonebreak.serving.loader import load_classifier
from bonebreak.serving.ui import FEEDBACK_NOTICE
from conftest import REPO, SHIPPED_MODEL, start_app, synthetic_xray


@pytest.fixture(scope="module")
def feedback_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    log = folder.parent / "feedback_app.log"
    process, url = start_app(REPO, dict(os.environ), log, ("--model_path", str(SHIPPED_MODEL), "--feedback_dir", str(folder / "flags")))
    yield url, folder / "flags"
    process.terminate()
    process.wait(timeout=30)


def test_flags_from_the_app_become_training_images(feedback_server, handful, tiny_vit, tmp_path):
    from gradio_client import Client, handle_file

    url, flags = feedback_server
    config = httpx.get(f"{url}config", timeout=30).json()
    assert any(FEEDBACK_NOTICE == c.get("props", {}).get("value") for c in config["components"])  # the page says what is stored
    pictures = []
    for seed in (21, 22):  # new X-rays: not copies of the handful's validation or Test images
        pictures.append(tmp_path / f"visitor {seed}.png")
        synthetic_xray(seed, size=(320, 280)).save(pictures[-1])
    predictor = load_classifier(SHIPPED_MODEL, backend="onnx")
    predicted = [predictor.analyse(str(p)).prediction.top_label for p in pictures]
    other = next(label for label in predictor.labels if label != predicted[0])

    client = Client(url, verbose=False)
    labels, _, _, cases = client.predict(handle_file(str(REPO / "examples" / "spiral_fracture.jpg")), True, api_name="/predict")
    assert len(labels["confidences"]) == 3 and len(cases) == 6  # /predict unchanged: four outputs
    assert client.predict(handle_file(str(pictures[0])), "wrong", other, api_name="/feedback").startswith("Thank you")
    assert client.predict(handle_file(str(pictures[1])), "right", None, api_name="/feedback").startswith("Thank you")
    with pytest.raises(Exception, match="not in the list of choices|Choose one of"):
        client.predict(handle_file(str(pictures[1])), "../etc/passwd", None, api_name="/feedback")

    with open(flags / "feedback.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["verdict"], r["visitor_type"], r["predicted"]) for r in rows] == [("wrong", other, predicted[0]), ("right", "", predicted[1])]
    assert {r["model"] for r in rows} == {SHIPPED_MODEL.name}
    assert sorted(f"images/{p.name}" for p in (flags / "images").iterdir()) == sorted(r["image"] for r in rows)

    out = tmp_path / "review"
    run("feedback", ["--feedback_dir", str(flags), "--output_dir", str(out)])
    assert (out / "contact_sheet.jpg").is_file()
    with open(out / "review.csv", newline="") as handle:
        review = list(csv.DictReader(handle))
    assert [r["proposed_label"] for r in review] == [other, predicted[1]]
    for row in review:
        row["accept"] = "yes"  # what the person writes after looking at the contact sheet
    with open(out / "review.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(review[0]))
        writer.writeheader()
        writer.writerows(review)
    run("feedback", ["--feedback_dir", str(flags), "--output_dir", str(out), "--apply"])
    extra = out / "extra_train"
    assert sorted(p.parent.name for p in extra.rglob("*.png")) == sorted([other, predicted[1]])

    before = len(load_splits(handful).splits["train"])
    model = tmp_path / "run"
    run("train", ["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(model),
                  "--num_workers", "0", "--extra_train_dir", str(extra)])
    metrics = json.loads((model / "metrics.json").read_text())
    edits = metrics["training_edits"]
    assert edits["extra_train_dir"]["images"] == 2 and edits["extra_train_dir"]["path"] == str(extra)
    assert edits["train_images"] == edits["train_images_before"] + 2 == before + 2
    assert sum(metrics["counts"]["train"].values()) == before + 2
    assert sum(metrics["counts"]["test"].values()) == len(load_splits(handful).splits["test"])  # Test untouched


def test_a_visitor_flags_a_wrong_answer_in_the_browser(feedback_server):
    """The real page in Debian chromium: the notice, an upload, "wrong" with another type, and the flag in the folder."""
    import shutil

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import expect, sync_playwright

    url, flags = feedback_server
    rows_before = (flags / "feedback.csv").read_text().count("\n") if (flags / "feedback.csv").is_file() else 1
    picture = REPO / "examples" / "avulsion_fracture.jpg"  # a real X-ray, so the answer names a type
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                     "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        expect(page.locator("#feedback-notice")).to_contain_text("Feedback is on", timeout=60_000)
        page.set_input_files("#upload input[type=file]", str(picture))
        expect(page.locator("#labels")).to_contain_text("%", timeout=60_000)
        answered = next(line.strip() for line in page.locator("#labels").inner_text().split("\n") if line.strip() and "probability" not in line)
        page.locator("#verdict").get_by_text("Wrong: the right type is").click()
        page.locator("#kind input").click()
        choice = next(label for label in ("Spiral", "Oblique") if label != answered)
        page.get_by_role("option", name=choice, exact=True).click()
        page.get_by_role("button", name="Send feedback").click()
        expect(page.locator("#feedback-status")).to_contain_text("Thank you", timeout=30_000)
        page.screenshot(path=str(REPO / "tests" / "artifacts" / "app_feedback.png"), full_page=True)
        browser.close()
    with open(flags / "feedback.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == rows_before and rows[-1]["predicted"] == answered and (rows[-1]["verdict"], rows[-1]["visitor_type"]) == ("wrong", choice)
