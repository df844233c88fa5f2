"""Decode whatever a user or a dataset hands us into an RGB PIL image, or a clear error: the one decoder.

Every entry point (dataset scan, training, the predict CLI, the app) decodes through
``load_image`` so that a 16-bit PNG, a CMYK JPEG or a DICOM file looks the same to the
model everywhere, and so that hostile files are refused before they cost memory.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} | DICOM_SUFFIXES


class ImageLoadError(ValueError):
    """The input cannot be turned into an image; the message says which input and why."""


@dataclass(frozen=True)
class DecodeLimits:
    """Explicit decoding limits; the defaults fit any real radiograph with room to spare."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 60_000_000  # e.g. a 7,700 x 7,700 film scan; a "bomb" is far larger
    max_side: int = 2048  # downscale before preprocessing: the model sees <= 512 px anyway
    min_side: int = 16
    max_aspect: float = 12.0


DEFAULT_LIMITS = DecodeLimits()


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def _is_dicom(head: bytes, suffix: str) -> bool:
    return head[128:132] == b"DICM" or suffix in DICOM_SUFFIXES


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Stretch any numeric range to 0..255; a plain cast would turn 16-bit X-rays white."""
    array = np.asarray(array, dtype=np.float64)
    lo, hi = np.percentile(array, [0.5, 99.5]) if array.size > 1 else (array.min(), array.max())
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, lo, hi) - lo) / (hi - lo) * 255.0
    return scaled.round().astype(np.uint8)


def _load_dicom(data: bytes, name: str) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, EOFError) as error:
        raise ImageLoadError(f"{name}: not a readable DICOM file ({error})") from error
    except Exception as error:  # pydicom raises bare exceptions for broken pixel data
        raise ImageLoadError(f"{name}: DICOM pixel data cannot be decoded ({error})") from error
    if pixels.ndim == 3 and getattr(dataset, "NumberOfFrames", 1) > 1:
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame file: the middle frame is representative
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return Image.fromarray(_to_uint8(pixels[..., :3])).convert("RGB")
    pixels = apply_modality_lut(pixels, dataset)
    pixels = apply_voi_lut(pixels, dataset)
    gray = _to_uint8(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bone dark; the model was trained on bone bright
    return Image.fromarray(gray).convert("RGB")


def _open_pil(data: bytes, name: str, limits: DecodeLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: refused, image dimensions are implausibly large ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(
            f"{name}: not a supported image (expected JPEG, PNG, BMP, GIF, TIFF, WebP or DICOM)"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:  # a known format, broken header
        raise ImageLoadError(f"{name}: image data is truncated or corrupt ({error})") from error
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            f"{name}: refused, {width}x{height} pixels exceeds the limit of {limits.max_pixels:,} pixels"
        )
    if image.format == "JPEG":
        image.draft("RGB", (limits.max_side, limits.max_side))  # decode big JPEGs at reduced scale
    try:
        image.seek(0)  # animated formats: the first frame
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{name}: image data is truncated or corrupt ({error})") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise orientation and pixel format of a decoded image to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Radiographs have a black background, so transparency becomes black, not white.
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def _check_geometry(image: Image.Image, name: str, limits: DecodeLimits) -> Image.Image:
    width, height = image.size
    if min(width, height) < limits.min_side:
        raise ImageLoadError(
            f"{name}: image is too small ({width}x{height} px); at least {limits.min_side} px per side is needed"
        )
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise ImageLoadError(
            f"{name}: aspect ratio {width}x{height} is too extreme for an X-ray (limit {limits.max_aspect:g}:1)"
        )
    if max(width, height) > limits.max_side:
        image = image.copy()
        image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    return image


def _read_bytes(path: Path, limits: DecodeLimits) -> bytes:
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, not an image file")
    size = path.stat().st_size
    if size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageLoadError(f"{path}: file is {size:,} bytes, over the limit of {limits.max_bytes:,} bytes")
    return path.read_bytes()


def load_image(source: ImageSource, limits: DecodeLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode a path, raw bytes, a PIL image or an array into a bounded 8-bit RGB image.

    Raises ``ImageLoadError`` naming the input and the problem for anything that is not a
    usable image; never returns a partially decoded picture.
    """
    name = _name(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source if source.dtype == np.uint8 else _to_uint8(source)
        image = Image.fromarray(array)
    else:
        if isinstance(source, bytes):
            data, suffix = source, ""
            if not data:
                raise ImageLoadError(f"{name}: input is empty (0 bytes)")
            if len(data) > limits.max_bytes:
                raise ImageLoadError(f"{name}: {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes")
        else:
            path = Path(source)
            data, suffix = _read_bytes(path, limits), path.suffix.lower()
        if _is_dicom(data[:132], suffix):
            image = _load_dicom(data, name)
        else:
            image = _open_pil(data, name, limits)
    return _check_geometry(to_rgb(image), name, limits)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
