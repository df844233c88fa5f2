"""The Gradio app: the predict function on every input kind, then the real server in a real
browser (Debian chromium driven by Playwright) and through gradio_client. (The answer texts and output
pictures without a model, and one request on the shipped model, are tests/test_ui_answers.py.)"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from bonebreak.models.torch_backend import TorchForward, load_classifier
from bonebreak.serving.loader import load_predictor
from bonebreak.serving.ui import NOT_XRAY, RequestHandler, build_demo, example_files, fracture_info
from conftest import REPO, SHIPPED_MODEL, bomb_png, gradient16, make_dicom, start_app, synthetic_xray

UPLOAD = "#upload input[type=file]"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def classify(trained_vit) -> RequestHandler:
    # Decoding is under test here, so the X-ray check (fitted on 10 images) is left out.
    return RequestHandler(load_predictor(trained_vit, torch_forward=TorchForward.from_checkpoint, xray_check=False, calibrated=False))


def good_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    base = synthetic_xray(11, size=(200, 160))
    paths = {}
    for name, image in {"a.jpg": base, "gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"),
                        "palette.png": base.quantize(64), "cmyk.jpg": base.convert("CMYK"),
                        "xray16.png": Image.fromarray(gradient16(160, 200))}.items():
        image.save(folder / name)
        paths[name] = folder / name
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(folder / "exif.jpg", exif=exif)
    synthetic_xray(12, size=(3000, 2400)).save(folder / "scan.png")
    make_dicom(folder / "scan.dcm", gradient16(160, 200))
    paths.update({n: folder / n for n in ("exif.jpg", "scan.png", "scan.dcm")})
    return paths


def bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    synthetic_xray(13, size=(300, 300)).save(buffer, format="JPEG")
    contents = {"empty.jpg": b"", "text.jpg": b"just text" * 50, "page.png": b"<html><script>x()</script></html>",
                "cut.jpg": buffer.getvalue()[:3000], "bomb.png": bomb_png(30000, 30000),
                "broken.dcm": b"\x00" * 128 + b"DICM" + b"\x01" * 64}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGB", (5000, 30)).save(folder / "strip.png")
    return {p.name: p for p in folder.iterdir()}


def test_every_good_input_kind_predicts(classify, tmp_path):
    for name, path in good_inputs(tmp_path).items():
        labels, text, heatmap, _ = classify(str(path), True)
        assert len(labels) == 3 and abs(sum(labels.values())) <= 1.0 + 1e-6, name
        assert list(labels.values()) == sorted(labels.values(), reverse=True), name
        assert "fracture" in text and Image.open(heatmap).size[0] >= 32, name
    _, _, plain, _ = classify(str(tmp_path / "scan.png"), False)
    assert max(Image.open(plain).size) <= 2048  # heat map off: the (downscaled) image itself is shown


def test_every_bad_input_gets_a_specific_message_and_the_next_one_works(classify, tmp_path):
    expected = {"empty.jpg": "empty", "text.jpg": "not a supported image", "page.png": "not a supported image",
                "cut.jpg": "truncated", "bomb.png": "refused", "broken.dcm": "DICOM", "dot.png": "too small",
                "strip.png": "aspect ratio"}
    for name, path in bad_inputs(tmp_path).items():
        with pytest.raises(gr.Error, match=expected[name]) as info:
            classify(str(path), True)
        assert name in str(info.value)
        labels, _, _, _ = classify(str(REPO / "examples" / "spiral_fracture.jpg"), True)
        assert len(labels) == 3
    with pytest.raises(gr.Error, match="upload an X-ray"):
        classify(None, True)


def test_unsure_is_said_plainly(trained_vit):
    classify = RequestHandler(load_classifier(trained_vit, unsure_below=1.0))
    _, text, _, _ = classify(str(REPO / "examples" / "spiral_fracture.jpg"), False)
    assert text.startswith("**The model is unsure.**")
    confident = RequestHandler(load_classifier(trained_vit, unsure_below=0.0))
    assert confident(str(REPO / "examples" / "spiral_fracture.jpg"), False)[1].startswith("**Most likely type:")


def test_not_an_xray_gets_no_fracture_type(trained_vit):
    predictor = load_classifier(trained_vit)
    assert predictor.xray_check is not None and predictor.temperature == 1.0  # the fitted one is folded into the head
    assert json.loads((trained_vit / "config.json").read_text())["bonebreak_temperature_folded"] == pytest.approx(
        json.loads((trained_vit / "calibration.json").read_text())["temperature"])
    predictor.xray_check.threshold = -1.0  # everything is unlike the training X-rays
    labels, text, image, _ = RequestHandler(predictor)(str(REPO / "examples" / "spiral_fracture.jpg"), False)
    assert labels == {} and text == NOT_XRAY and Path(image).is_file()


def test_demo_builds_without_side_effects(classify):
    assert len(example_files()) >= 3
    demo = build_demo(classify.predictor)
    assert isinstance(demo, gr.Blocks)


# --- the real server -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "app.log"
    process, url = start_app(REPO, dict(os.environ), log, ("--model_path", str(SHIPPED_MODEL)))
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_gradio_client_api(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    labels, text, heatmap, cases = client.predict(handle_file(str(REPO / "examples" / "greenstick_fracture.jpg")), True, api_name="/predict")
    assert len(labels["confidences"]) == 3 and labels["label"] == labels["confidences"][0]["label"]
    assert "fracture" in text and Path(heatmap).is_file()
    assert len(cases) == 6 and all(Path(case["image"]).is_file() and ", similarity " in case["caption"] for case in cases)
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(Exception, match="not a supported image"):
        client.predict(handle_file(str(tmp_path / "bad.jpg")), True, api_name="/predict")
    labels, _, _, _ = client.predict(handle_file(str(REPO / "examples" / "avulsion_fracture.jpg")), False, api_name="/predict")
    assert len(labels["confidences"]) == 3  # the server still serves after a bad upload


def test_browser_upload_shows_labels_info_heatmap_and_errors(server, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import expect, sync_playwright

    screenshots = REPO / "tests" / "artifacts"
    screenshots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server)
        expect(page.get_by_text("not a diagnostic device")).to_be_visible(timeout=60_000)
        page.set_input_files(UPLOAD, str(REPO / "examples" / "spiral_fracture.jpg"))
        expect(page.locator("#preview img")).to_be_visible(timeout=30_000)  # the picture itself, not only its file name
        labels = page.locator("#labels")
        expect(labels).to_contain_text("%", timeout=60_000)
        text = labels.inner_text()
        assert sum(name in text for name in fracture_info() if not name.startswith("_")) >= 3
        expect(page.locator("#info")).to_contain_text("Usual management", timeout=30_000)
        expect(page.locator("#heatmap img")).to_be_visible(timeout=30_000)
        expect(page.locator("#cases img")).to_have_count(6, timeout=30_000)  # the similar cases, with their labels
        expect(page.locator("#cases")).to_contain_text("similarity")
        page.screenshot(path=str(screenshots / "app.png"), full_page=True)
        page.set_viewport_size({"width": 400, "height": 900})  # a phone: the columns stack, nothing overflows sideways
        expect(page.locator("#preview img")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
        page.screenshot(path=str(screenshots / "app_phone.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 1000})

        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
        page.reload()  # a filled gr.File hides its input; a fresh page is what a new visitor gets
        page.set_input_files(UPLOAD, str(tmp_path / "broken.jpg"))
        expect(page.get_by_text("Could not read 'broken.jpg'")).to_be_visible(timeout=30_000)
        page.screenshot(path=str(screenshots / "app_error.png"), full_page=True)
        browser.close()
