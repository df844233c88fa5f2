"""One preprocessing for training's evaluation and serving (numpy and Pillow, no PyTorch): its pixels equal the
torchvision pipeline training used before 0.6, and training's evaluation transform is the same code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from bonebreak.data.preprocess import PreprocessConfig, model_view, preprocess, preprocess_config
from bonebreak.training.augment import AugmentConfig, eval_transform, train_transform
from conftest import synthetic_xray

INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                 "nearest": v2.InterpolationMode.NEAREST, "lanczos": v2.InterpolationMode.LANCZOS}


def torchvision_reference(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The pipeline of bonebreak/transforms.py before 0.6 (what the shipped model was trained and evaluated with)."""
    steps = v2.Compose([v2.Resize(int(round(cfg.image_size / cfg.crop_pct)), interpolation=INTERPOLATION[cfg.interpolation], antialias=True),
                        v2.CenterCrop(cfg.image_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(list(cfg.mean), list(cfg.std))])
    return steps(image).numpy()


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.mark.parametrize("size", [(96, 80), (80, 96), (300, 97), (31, 500), (224, 224), (10, 12)])
@pytest.mark.parametrize("cfg", [PreprocessConfig(224, **IMAGENET, crop_pct=0.875), PreprocessConfig(64, mean=(0.5,) * 3, std=(0.5,) * 3),
                                 PreprocessConfig(57, **IMAGENET, crop_pct=0.9, interpolation="bilinear"),
                                 PreprocessConfig(48, **IMAGENET, interpolation="lanczos")])
def test_pixels_equal_the_torchvision_pipeline(size, cfg):
    image = synthetic_xray(sum(size), size)
    ours = preprocess(image, cfg)
    assert ours.shape == (3, cfg.image_size, cfg.image_size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_reference(image, cfg), atol=1e-6)


def test_training_evaluates_with_the_serving_preprocessing():
    cfg = PreprocessConfig(64, **IMAGENET, crop_pct=0.875)
    image = synthetic_xray(3, (120, 90))
    np.testing.assert_array_equal(eval_transform(cfg)(image).numpy(), preprocess(image, cfg))


def test_augmentation_ends_in_the_same_normalisation():
    """A training sample is normalised with the checkpoint's mean/std: an all-grey picture stays one value per channel."""
    cfg = PreprocessConfig(32, **IMAGENET)
    grey = Image.new("RGB", (50, 40), (128, 128, 128))
    sample = train_transform(cfg, AugmentConfig(rotation_degrees=0, brightness=0, contrast=0))(grey).numpy()
    expected = (128 / 255 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(sample.reshape(3, -1).mean(axis=1), expected, atol=1e-5)


def test_equalisation_is_applied_only_when_the_model_was_trained_with_it():
    image = synthetic_xray(5, (64, 64))
    plain, equalised = PreprocessConfig(64, **IMAGENET), PreprocessConfig(64, **IMAGENET, equalize=True)
    assert not np.allclose(preprocess(image, plain), preprocess(image, equalised))


def test_model_view_undoes_the_normalisation():
    cfg = PreprocessConfig(64, **IMAGENET)
    image = synthetic_xray(9, (64, 64))
    view = np.asarray(model_view(preprocess(image, cfg), cfg), dtype=int)
    assert np.abs(view - np.asarray(image, dtype=int)).max() <= 1


def test_config_comes_from_the_checkpoint_files():
    """timm-backed models keep their preprocessing in config.json; other models in preprocessor_config.json."""
    timm = preprocess_config(None, {"model_type": "timm_wrapper", "pretrained_cfg": {"input_size": [3, 320, 320], "crop_pct": 1.0,
                                                                                     "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
                                    "bonebreak_equalize": True})
    assert (timm.image_size, timm.crop_pct, timm.interpolation, timm.equalize, timm.mean) == (320, 1.0, "bilinear", True, (0.5,) * 3)
    vit = preprocess_config({"size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}, {})
    assert (vit.image_size, vit.crop_pct, vit.interpolation) == (64, 1.0, "bilinear")
    convnext = preprocess_config({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": [0.4] * 3, "image_std": [0.2] * 3}, {})
    assert (convnext.image_size, convnext.crop_pct) == (224, 0.875)
    with pytest.raises(ValueError, match="input size"):
        preprocess_config(None, {"model_type": "vit"})
