"""The heat map's arithmetic in numpy (serving has no PyTorch): CAM, upsampling, the jet overlay. Fast; written to
kill the mutants mutmut found surviving in bonebreak/serving/heatmaps.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bonebreak.serving.heatmaps import JET_COLOURS, class_activation_map, overlay_heatmap, upsample


def test_cam_keeps_the_positive_evidence_only():
    class_map = np.array([[-2.0, 0.0], [0.25, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(class_activation_map(class_map), [[0.0, 0.0], [0.25, 3.0]])


@pytest.mark.parametrize("shape,size", [((7, 7), (224, 224)), ((3, 5), (10, 17)), ((1, 1), (4, 4)), ((10, 8), (10, 8))])
def test_upsample_equals_torch_bilinear_and_peaks_at_one(shape, size):
    cam = np.random.default_rng(sum(shape)).random(shape)
    reference = torch.nn.functional.interpolate(torch.tensor(cam)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    ours = upsample(cam, size)
    assert ours.shape == tuple(size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference / reference.max(), atol=1e-6)
    assert ours.max() == pytest.approx(1.0)


def test_upsample_of_an_empty_map_stays_zero():
    assert not upsample(np.zeros((4, 4)), (8, 8)).any()


def test_overlay_blends_jet_colours_over_the_view():
    view = Image.new("RGB", (20, 10), (100, 100, 100))
    heat = np.zeros((10, 20))
    heat[:, 10:] = 1.0
    blended = np.asarray(overlay_heatmap(view, heat, alpha=0.5), dtype=int)
    assert blended.shape == (10, 20, 3)
    cold, hot = (np.asarray(JET_COLOURS[0], dtype=int) + 100) // 2, (np.asarray(JET_COLOURS[255], dtype=int) + 100) // 2
    assert np.abs(blended[5, 2] - cold).max() <= 1 and np.abs(blended[5, 17] - hot).max() <= 1
    assert hot[0] > hot[2] and cold[2] > cold[0]  # hot is red, cold is blue
    np.testing.assert_array_equal(np.asarray(overlay_heatmap(view, heat, alpha=0.0)), np.asarray(view))


def test_overlay_scales_a_small_heat_map_to_the_view():
    view = Image.new("L", (32, 16), 0)
    out = overlay_heatmap(view, np.ones((4, 8)), alpha=1.0)
    assert out.size == (32, 16) and out.mode == "RGB"
    assert (np.asarray(out) == JET_COLOURS[255]).all()


def test_jet_colours_match_matplotlib():
    from matplotlib import colormaps

    expected = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    assert np.abs(JET_COLOURS.astype(int) - expected.astype(int)).max() <= 1


def test_overlay_colour_index_rounds_and_saturates():
    """0.75 -> jet colour 191; values outside 0..1 (a map not from ``upsample``) saturate instead of wrapping."""
    view = Image.new("RGB", (4, 1), (0, 0, 0))
    out = np.asarray(overlay_heatmap(view, np.array([[0.75, 1.5, -0.5, 0.0]]), alpha=1.0))
    np.testing.assert_array_equal(out[0], JET_COLOURS[[191, 255, 0, 0]])
