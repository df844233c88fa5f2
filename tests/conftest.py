"""Shared fixtures: synthetic image folders, a handful of real X-rays, tiny random models.

Two kinds of real data:

- ``handful``: 40 real X-rays committed in tests/fixtures/bone-break-mini (CC BY 4.0, see its
  ATTRIBUTION.md), so the suite runs on a fresh clone.
- ``real_data``: the full dataset (``BONEBREAK_TEST_DATA``, default ../shared/datasets/bone-break).
  Tests using it are marked ``full_data`` and are skipped, with the reason in the ``-ra``
  summary, when it is absent; ``BONEBREAK_REQUIRE_FULL_DATA=1`` (set by CI) fails them instead.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach for the network

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("BONEBREAK_TEST_DATA", REPO.parent / "shared" / "datasets" / "bone-break"))
REQUIRE_FULL_DATA = os.environ.get("BONEBREAK_REQUIRE_FULL_DATA", "") == "1"  # CI: a missing dataset fails, never skips
FIXTURE_DATA = REPO / "tests" / "fixtures" / "bone-break-mini"  # 40 committed real X-rays
FIXTURE_FILES = 40  # 3 Train + 1 Test per class folder
SHIPPED_MODEL = Path(os.environ.get("BONEBREAK_TEST_MODEL", REPO / "checkpoints" / "bone_break_model"))


def synthetic_xray(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A grey 'bone' bar on black with a seeded crack angle: distinct per seed, deterministic."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    bone = (np.abs(x - w / 2) < w / 6).astype(float) * 180
    angle = rng.uniform(-1, 1)
    crack = np.abs((y - h / 2) - angle * (x - w / 2)) < 2
    array = np.clip(bone * ~crack + rng.normal(0, 12, (h, w)) + 20, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_xray(seed).save(path)
    return path


# Modules whose tests train real models or start the real server and browser (seconds to a
# minute each); `pytest -m "not slow"` runs the rest in about a minute.
SLOW_MODULES = {"test_app", "test_export", "test_feedback_flow", "test_heatmap", "test_hub_backbones", "test_own_dataset", "test_recipes", "test_reliability",
                "test_requirements", "test_space", "test_training"}


def pytest_collection_modifyitems(config, items):
    """Mark the slow modules; and every test that needs the full dataset must say so, so that
    `-m "not full_data"` is honest."""
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    unmarked = [item.nodeid for item in items if "real_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("full_data") is None]
    if unmarked:
        raise pytest.UsageError("tests using the real_data fixture must be marked @pytest.mark.full_data: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The full dataset (1,129 images): only for tests that need all of it (marker full_data)."""
    if not REAL_DATA.is_dir():
        message = (f"full dataset not found at {REAL_DATA}: set BONEBREAK_TEST_DATA=<folder> to run the full-data tests "
                   "(see README 'Getting the data')")
        if REQUIRE_FULL_DATA:
            pytest.fail(f"{message}; BONEBREAK_REQUIRE_FULL_DATA=1 forbids skipping them", pytrace=False)
        pytest.skip(message)
    return REAL_DATA


@pytest.fixture(scope="session")
def handful(tmp_path_factory) -> Path:
    """Kaggle layout with 3 train and 1 test real image per class (40 files), from the committed fixture.

    A per-session copy of tests/fixtures/bone-break-mini (images only, not ATTRIBUTION.md), so no test
    can modify the repository and the folder holds exactly the 40 images.
    """
    images = sorted(p for p in FIXTURE_DATA.rglob("*") if p.is_file() and p.suffix.lower() == ".jpg")
    assert len(images) == FIXTURE_FILES, f"{FIXTURE_DATA} should hold {FIXTURE_FILES} JPEGs, found {len(images)}"
    root = tmp_path_factory.mktemp("handful") / "bone-break-mini"
    shutil.copytree(FIXTURE_DATA, root, ignore=shutil.ignore_patterns("*.md"))
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_convnext(tmp_path_factory) -> Path:
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    folder = tmp_path_factory.mktemp("tiny_convnext")
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=64, num_labels=3)
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> Path:
    """$HF_HOME whose hub/ cache holds tiny random ViT, ConvNeXt, Swin and DINOv2 models under their real Hub ids, laid
    out as a download leaves it (tests/hub_cache.py); ``hub_cache.use_hub_cache(monkeypatch, hub_home)`` points
    huggingface_hub and transformers at it, offline."""
    from hub_cache import build_hub_cache

    home = tmp_path_factory.mktemp("hf_home")
    build_hub_cache(home)
    return home


@pytest.fixture(scope="session")
def trained_vit(handful: Path, tiny_vit: Path, tmp_path_factory) -> Path:
    """A tiny ViT trained one epoch on the handful of real images (shared by several tests)."""
    from bonebreak.commands.train import main

    out = tmp_path_factory.mktemp("runs") / "vit"
    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out), "--num_workers", "0"])
    return out


def start_app(cwd: Path, env: dict[str, str], log: Path, args: tuple[str, ...] = (), timeout: float = 180.0):
    """Start `python app.py *args` in ``cwd`` offline (HF_HUB_OFFLINE=1, no analytics) on a free
    port, passed as GRADIO_SERVER_PORT the way a Space passes it, and wait until it listens.
    Returns (process, url); fails the test with the tail of ``log`` if the app exits or does not
    listen within ``timeout`` seconds."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "GRADIO_SERVER_PORT": str(port)}
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "app.py", *args], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited early:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"app.py did not start within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def make_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A minimal 12-bit-in-16 grayscale DICOM file (uncompressed) with the given pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient16(h: int = 64, w: int = 80, top: int = 4095) -> np.ndarray:
    """A left-dark, right-bright 16-bit ramp (12-bit values by default)."""
    return (np.tile(np.linspace(0, top, w), (h, 1))).astype(np.uint16)


def write_manifest(root: Path, path: Path, leaked: set[str] = frozenset(), validation: set[str] = frozenset()) -> Path:
    """A split manifest (path,label,split,group) for a Kaggle-layout folder: pairs of files share a group."""
    from bonebreak.data.layouts import clean_label

    rows = ["path,label,split,group"]
    for i, file in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        relative = file.relative_to(root).as_posix()
        label = clean_label(relative.split("/")[0])
        if "/Test/" in relative:
            split = "test_leaked" if relative in leaked else "clean_test"
        else:
            split = "validation" if relative in validation else "train"
        rows.append(f"{relative},{label},{split},{i // 2}")
    path.write_text("\n".join(rows) + "\n")
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header claiming huge dimensions, tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressed = zlib.compress(row * 64, 9)  # only a few rows: never decoded anyway
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")
