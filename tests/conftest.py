"""Shared fixtures: synthetic image folders, a handful of real X-rays, tiny random models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach for the network

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("BONEBREAK_TEST_DATA", REPO.parent / "shared" / "datasets" / "bone-break"))
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


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"the real dataset is expected at {REAL_DATA} (set BONEBREAK_TEST_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def handful(real_data: Path, tmp_path_factory) -> Path:
    """Kaggle layout with 3 train and 1 test real image per class (copies, 40 files)."""
    root = tmp_path_factory.mktemp("handful")
    for class_dir in sorted(p for p in real_data.iterdir() if p.is_dir()):
        for split, n in (("Train", 3), ("Test", 1)):
            target = root / class_dir.name / split
            target.mkdir(parents=True)
            for source in sorted((class_dir / split).iterdir())[:n]:
                shutil.copy(source, target / source.name)
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
def trained_vit(handful: Path, tiny_vit: Path, tmp_path_factory) -> Path:
    """A tiny ViT trained one epoch on the handful of real images (shared by several tests)."""
    from bonebreak.training import main

    out = tmp_path_factory.mktemp("runs") / "vit"
    main(["--data_dir", str(handful), "--model", str(tiny_vit), "--epochs", "1", "--batch_size", "8", "--output_dir", str(out), "--num_workers", "0"])
    return out
