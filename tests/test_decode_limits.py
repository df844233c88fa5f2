"""The edges of bonebreak.data.decode: each DecodeLimits bound exactly at and just past its value, the
defaults, inputs that are not files (bytes, arrays, PIL images), pixel modes and DICOM variants that
tests/test_images.py does not reach, and which file names count as images.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bonebreak.data.decode import DecodeLimits, ImageLoadError, is_image_file, load_image
from conftest import bomb_png, gradient16, make_dicom, synthetic_xray


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the limits, exactly at and one past each bound ----------------------------------------------------


def test_the_pixel_limit_allows_exactly_its_value():
    limits = DecodeLimits(max_pixels=100 * 100)
    assert load_image(png_bytes(synthetic_xray(1, size=(100, 100))), limits).size == (100, 100)
    with pytest.raises(ImageLoadError, match=r"^<bytes>: refused, 100x101 pixels exceeds the limit of 10,000 pixels$"):
        load_image(bomb_png(100, 101), limits)  # refused from the header, before any pixel is decoded


def test_the_default_pixel_limit_is_sixty_megapixels():
    with pytest.raises(ImageLoadError, match="6000x10001 pixels exceeds the limit of 60,000,000 pixels"):
        load_image(bomb_png(6000, 10001))


def test_the_byte_limit_allows_exactly_its_value_for_files_and_bytes(tmp_path):
    data = png_bytes(synthetic_xray(2))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    exact, under = DecodeLimits(max_bytes=len(data)), DecodeLimits(max_bytes=len(data) - 1)
    assert load_image(path, exact).size == load_image(data, exact).size == (96, 80)
    with pytest.raises(ImageLoadError, match=rf"x.png: file is {len(data):,} bytes, over the limit of {len(data) - 1:,} bytes"):
        load_image(path, under)
    with pytest.raises(ImageLoadError, match=rf"^<bytes>: {len(data):,} bytes, over the limit of {len(data) - 1:,} bytes"):
        load_image(data, under)


def test_the_default_byte_limit_is_64_mib(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:  # a sparse file: 64 MiB + 1 byte without writing them
        handle.truncate(64 * 1024 * 1024 + 1)
    with pytest.raises(ImageLoadError, match="over the limit of 67,108,864 bytes"):
        load_image(path)


@pytest.mark.parametrize("size, accepted", [((16, 16), True), ((15, 40), False), ((40, 15), False)])
def test_the_default_smallest_side_is_16_pixels(size, accepted):
    if accepted:
        assert load_image(Image.new("RGB", size)).size == size
    else:
        with pytest.raises(ImageLoadError, match=rf"^<Image>: image is too small \({size[0]}x{size[1]} px\); at least 16 px"):
            load_image(Image.new("RGB", size))


@pytest.mark.parametrize("size, accepted", [((240, 20), True), ((20, 240), True), ((241, 20), False), ((20, 241), False)])
def test_the_default_aspect_limit_is_12_to_1_either_way(size, accepted):
    if accepted:
        assert load_image(Image.new("RGB", size)).size == size
    else:
        with pytest.raises(ImageLoadError, match=r"is too extreme for an X-ray \(limit 12:1\)"):
            load_image(Image.new("RGB", size))


def test_images_up_to_2048_pixels_keep_their_size_and_larger_ones_shrink_to_it():
    assert load_image(Image.new("RGB", (2048, 1000))).size == (2048, 1000)
    assert load_image(Image.new("RGB", (1024, 4096))).size == (512, 2048)


# --- inputs that are not files -----------------------------------------------------------------------


def test_empty_bytes_are_refused_as_empty():
    with pytest.raises(ImageLoadError, match=r"^<bytes>: input is empty \(0 bytes\)$"):
        load_image(b"")


def test_an_empty_file_is_refused_by_name(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"zero.png: file is empty \(0 bytes\)$"):
        load_image(tmp_path / "zero.png")


def test_a_16bit_array_is_stretched_to_the_full_8bit_range():
    gray = np.asarray(load_image(gradient16() + 1000))[..., 0]  # 1000..5095: the darkest value is not 0
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255 and 100 < gray.mean() < 155


def test_an_8bit_array_is_used_as_is_not_stretched():
    array = np.full((32, 32), 60, dtype=np.uint8)
    array[:, 16:] = 90  # a low-contrast image stays low-contrast: 8-bit values are already display values
    assert np.unique(np.asarray(load_image(array))).tolist() == [60, 90]


def test_an_array_of_python_ints_is_windowed_too():
    # np.array of Python ints is int64, which Pillow cannot take: it has to be windowed to 8 bits first.
    gray = np.asarray(load_image(np.array(gradient16().tolist())))[..., 0]
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255


def test_a_uniform_array_becomes_black_not_an_error():
    assert np.asarray(load_image(np.full((32, 32), 1000, dtype=np.uint16))).max() == 0


def test_a_sparse_float_array_is_stretched_over_its_whole_range():
    # 99% zeros: the 0.5-99.5 percentile window is empty, so the full min..max range is used instead.
    array = np.zeros((100, 100))
    array[0, :10] = 1.0
    gray = np.asarray(load_image(array))[..., 0]
    assert gray[0, :10].tolist() == [255] * 10 and gray[1:].max() == 0


def test_the_window_is_the_half_to_99_5_percentile_and_outliers_are_clipped_to_it():
    array = np.tile(np.linspace(0.0, 1.0, 101), (100, 1))
    array[0, 0], array[0, 1] = 1000.0, -1000.0  # one hot and one cold pixel must not stretch the window
    gray = np.asarray(load_image(array))[..., 0]
    assert gray[0, 0] == 255 and gray[0, 1] == 0
    assert gray[50, [1, 2, 50, 100]].tolist() == [3, 5, 128, 255]  # the ramp keeps its full 0..255 range


# --- pixel modes and DICOM variants ----------------------------------------------------------------------


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2"), ("I", "<i4"), ("F", "<f4")])
def test_16bit_32bit_and_float_images_are_windowed_not_clipped_white(mode, dtype):
    # Pillow's own convert("RGB") clips these modes at 255: a 12-bit ramp would come out almost all white.
    ramp = gradient16()
    image = Image.frombytes(mode, ramp.shape[::-1], ramp.astype(dtype).tobytes())
    gray = np.asarray(load_image(image))[..., 0]
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255 and 100 < gray.mean() < 155


@pytest.mark.parametrize("mode", ["LA", "PA", "P"])
def test_transparent_pixels_become_black(mode):
    grey = Image.new("L", (32, 32), 200)
    alpha = Image.new("L", (32, 32), 255)
    alpha.paste(0, (0, 0, 8, 32))  # a transparent strip on the left
    if mode == "P":  # a palette image whose index 0, white, is the transparent one
        image = Image.new("P", (32, 32), 1)
        image.putpalette([255, 255, 255, 200, 200, 200])
        image.paste(0, (0, 0, 8, 32))
        image.info["transparency"] = 0
    else:  # an alpha band beside grey (LA) or palette (PA) pixels
        image = grey.convert(mode[0])
        image.putalpha(alpha)
    assert image.mode == mode
    rgb = np.asarray(load_image(image))
    assert rgb[:, :8].max() == 0 and (rgb[:, 8:] >= 190).all()


@pytest.mark.parametrize("count", [2, 5])  # two frames are already a multi-frame file
def test_a_multi_frame_dicom_shows_its_middle_frame(tmp_path, count):
    from pydicom import dcmread

    frames = np.stack([np.full((32, 32), 4000 if i == count // 2 else 0, np.uint16) for i in range(count)])
    frames[:, :, :16] = 2000  # the left half is the same grey on every frame; the right half differs
    path = make_dicom(tmp_path / "a.dcm", frames[0])
    dataset = dcmread(path)
    dataset.NumberOfFrames, dataset.PixelData = count, frames.tobytes()
    dataset.save_as(path)
    gray = np.asarray(load_image(path))[..., 0]
    assert gray[:, 16:].min() == 255 and gray[:, :16].max() == 0  # the middle frame: its right half is the brightest


def test_an_rgb_dicom_keeps_its_colours_and_skips_the_grey_level_window(tmp_path):
    from pydicom import dcmread

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 0
    rgb[:, :16, 1] = 255  # left half yellow, right half red
    path = make_dicom(tmp_path / "colour.dcm", np.zeros((32, 32)))
    dataset = dcmread(path)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelData = rgb.tobytes()
    dataset.WindowCenter, dataset.WindowWidth = 200, 20  # meant for grey levels: pydicom refuses it on colour
    dataset.save_as(path)
    decoded = np.asarray(load_image(path))
    assert decoded[0, 0].tolist() == [255, 255, 0] and decoded[0, -1].tolist() == [255, 0, 0]


def test_a_dicom_with_missing_pixel_data_is_refused_by_name(tmp_path):
    from pydicom import dcmread

    path = make_dicom(tmp_path / "cut.dcm", gradient16())
    dataset = dcmread(path)
    dataset.PixelData = dataset.PixelData[:100]  # a valid header, most of the pixels gone
    dataset.save_as(path)
    with pytest.raises(ImageLoadError, match="cut.dcm: DICOM pixel data cannot be decoded"):
        load_image(path)


def test_a_dcm_file_without_the_dicm_marker_is_still_read_as_dicom(tmp_path):
    path = tmp_path / "scan.DCM"  # suffixes are case-insensitive
    path.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(ImageLoadError, match="scan.DCM: not a readable DICOM file"):
        load_image(path)


# --- which files count as images ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("a.jpg", True), ("B.JPEG", True), ("c.Dcm", True), ("d.dicom", True), ("e.webp", True),
                                            ("notes.txt", False), (".hidden.png", False), ("noext", False)])
def test_image_files_are_recognised_by_suffix_in_any_case_but_hidden_files_are_not(tmp_path, name, expected):
    (tmp_path / name).write_bytes(b"x")
    assert is_image_file(tmp_path / name) is expected


def test_a_folder_named_like_an_image_is_not_an_image_file(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    assert not is_image_file(tmp_path / "album.jpg")
