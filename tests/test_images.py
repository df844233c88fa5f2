"""Every kind of input people upload decodes correctly or fails with a specific message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bonebreak.data.decode import DecodeLimits, ImageLoadError, load_image
from conftest import bomb_png, gradient16, make_dicom, synthetic_xray


def test_jpeg_and_png_roundtrip(tmp_path):
    source = synthetic_xray(1)
    for suffix in ("jpg", "png", "bmp", "webp", "tiff"):
        path = tmp_path / f"x.{suffix}"
        source.save(path)
        image = load_image(path)
        assert image.mode == "RGB" and image.size == source.size
        assert abs(np.asarray(image, float).mean() - np.asarray(source, float).mean()) < 3


def test_16bit_grayscale_is_windowed_not_white(tmp_path):
    path = tmp_path / "xray16.png"
    Image.fromarray(gradient16()).save(path)  # 12-bit data in a 16-bit PNG
    assert Image.open(path).mode.startswith("I")
    array = np.asarray(load_image(path))[..., 0].astype(float)
    assert array[:, :5].mean() < 20 and array[:, -5:].mean() > 235  # full range, left dark, right bright
    assert 100 < array.mean() < 155


def test_8bit_grayscale_rgba_palette_cmyk(tmp_path):
    gray = synthetic_xray(2).convert("L")
    rgba = synthetic_xray(2).convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, :10] = 0  # a transparent strip becomes black, like an X-ray background
    rgba.putalpha(Image.fromarray(alpha))
    cases = {"gray.png": gray, "rgba.png": rgba, "palette.png": synthetic_xray(2).quantize(64), "cmyk.jpg": synthetic_xray(2).convert("CMYK")}
    reference = np.asarray(gray, float)
    for name, image in cases.items():
        image.save(tmp_path / name)
        decoded = np.asarray(load_image(tmp_path / name), float)
        assert decoded.shape == (*gray.size[::-1], 3), name
        region = decoded[:, 12:, 0] if name == "rgba.png" else decoded[..., 0]
        expected = reference[:, 12:] if name == "rgba.png" else reference
        assert np.abs(region - expected).mean() < 12, name
    assert np.asarray(load_image(tmp_path / "rgba.png"))[:, :10].max() == 0


def test_exif_rotation_is_applied(tmp_path):
    image = synthetic_xray(3, size=(120, 60))  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo of a film held sideways
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (60, 120)


def test_dicom_is_windowed_and_monochrome1_inverted(tmp_path):
    pixels = gradient16()
    normal = np.asarray(load_image(make_dicom(tmp_path / "a.dcm", pixels)))[..., 0].astype(float)
    inverted = np.asarray(load_image(make_dicom(tmp_path / "b.dcm", pixels, "MONOCHROME1")))[..., 0].astype(float)
    assert normal[:, :5].mean() < 20 and normal[:, -5:].mean() > 235
    assert inverted[:, :5].mean() > 235 and inverted[:, -5:].mean() < 20
    # Detected by content, not by name.
    (tmp_path / "c.bin").write_bytes((tmp_path / "a.dcm").read_bytes())
    assert load_image(tmp_path / "c.bin").size == (80, 64)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [synthetic_xray(4), Image.new("RGB", (96, 80), "white")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(tmp_path / "anim.gif"), float).mean() < 200


def test_large_scan_is_downscaled(tmp_path):
    big = synthetic_xray(5, size=(4000, 3000))
    big.save(tmp_path / "big.png")
    image = load_image(tmp_path / "big.png", DecodeLimits(max_side=1024))
    assert max(image.size) == 1024 and image.size[0] > image.size[1]


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 9000)])
def test_decompression_bomb_is_refused(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size))
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="bomb.png.*(refused|implausibly large)"):
        load_image(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"hello, this is not a picture\n" * 10, "not a supported image"),
        ("page.png", b"<html><script>alert(1)</script></html>", "not a supported image"),
        ("drawing.jpg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "not a supported image"),
        ("broken.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00garbage" * 20, "DICOM"),
    ],
)
def test_non_images_are_refused_by_name(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(path)
    assert name in str(info.value)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_files_are_refused(tmp_path, suffix):
    buffer = io.BytesIO()
    synthetic_xray(6, size=(300, 300)).save(buffer, format="JPEG" if suffix == "jpg" else "PNG")
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(path)


def test_broken_header_is_refused(tmp_path):
    path = tmp_path / "header.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    with pytest.raises(ImageLoadError, match="header.jpg: image data is truncated or corrupt"):
        load_image(path)


def test_tiny_and_elongated_images_are_refused(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (4000, 20)).save(tmp_path / "strip.png")
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(tmp_path / "dot.png")
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(tmp_path / "strip.png")


def test_missing_folder_bytes_and_arrays(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(b"x" * 2000, DecodeLimits(max_bytes=1000))
    buffer = io.BytesIO()
    synthetic_xray(7).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (96, 80)
    assert load_image(np.asarray(synthetic_xray(7))).size == (96, 80)
