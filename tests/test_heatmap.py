"""The heat map ("where the model looked") is right, not just present.

For the shipped EfficientNet-Lite0 the map comes from the classifying forward pass (CAM: the
class's head weights times the last feature map, the network's ``class_maps`` output). These tests
pin it to references computed another way, so that a map that is all zeros, uniform, or for the
wrong class fails.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from bonebreak.common.checkpoint_format import CLASS_MAPS
from bonebreak.models.torch_backend import TorchForward
from bonebreak.serving.heatmaps import overlay_heatmap, upsample
from bonebreak.serving.loader import load_predictor
from bonebreak.serving.onnx_runtime import OnnxForward
from bonebreak.serving.predictor import Predictor
from bonebreak.serving.ui import OutputImages, RequestHandler
from conftest import REPO, SHIPPED_MODEL

EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
ALPHA = 0.45  # overlay_heatmap's default blend


ON_CPU = partial(TorchForward.from_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def torch_predictor() -> Predictor:
    predictor = load_predictor(SHIPPED_MODEL, "torch", ON_CPU, calibrated=False)
    assert isinstance(predictor.forward, TorchForward)
    return predictor


@pytest.fixture(scope="module")
def onnx_predictor() -> Predictor:
    predictor = load_predictor(SHIPPED_MODEL, "onnx", ON_CPU, calibrated=False)
    assert isinstance(predictor.forward, OnnxForward)
    return predictor


def model_input(predictor: Predictor, image: Image.Image) -> torch.Tensor:
    """The image as the predictor's network takes it: a (1, 3, H, W) tensor."""
    return torch.from_numpy(predictor.pixels([image]))


def classic_grad_cam(predictor: Predictor, image: Image.Image, label: str) -> np.ndarray:
    """Grad-CAM from the PyTorch backend's own forward and backward pass, upsampled to the input and scaled to 0..1."""
    pixels = predictor.pixels([image])
    return upsample(predictor.forward.grad_cam(pixels, predictor.labels.index(label)), pixels.shape[-2:])


def hooked_grad_cam(predictor: Predictor, image: Image.Image, target: int) -> np.ndarray:
    """Textbook Grad-CAM, written independently of bonebreak: a hook on the layer whose output feeds
    the pooled head (EfficientNet's bn2), the model's own transformers forward, a backward pass,
    channel weights = mean gradient, relu, bilinear upsampling, scaled to 0..1."""
    model = predictor.forward.model
    captured = {}
    handle = model.timm_model.bn2.register_forward_hook(lambda module, inputs, output: captured.update(features=output))
    try:
        pixels = model_input(predictor, image)
        with torch.enable_grad():
            logits = model(pixel_values=pixels).logits
            (gradients,) = torch.autograd.grad(logits[0, target], captured["features"])
    finally:
        handle.remove()
    weights = gradients[0].mean(dim=(1, 2))
    cam = torch.relu(torch.einsum("c,chw->hw", weights, captured["features"][0].detach()))
    cam = torch.nn.functional.interpolate(cam[None, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).numpy()


def weights_times_features(predictor: Predictor, image: Image.Image, target: int) -> np.ndarray:
    """CAM from its definition, in numpy: relu(sum_c W[target, c] * F[c]) of the PyTorch model."""
    timm_model = predictor.forward.model.timm_model
    with torch.inference_mode():
        features = timm_model.forward_features(model_input(predictor, image))[0].numpy()
    weights = timm_model.get_classifier().weight.detach().numpy()[target]
    cam = np.maximum((weights[:, None, None] * features).sum(axis=0), 0)
    size = model_input(predictor, image).shape[-2:]
    cam = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).numpy()


def assert_informative(heatmap: np.ndarray) -> None:
    """Not all zeros, not constant: a real map peaks at 1 and spreads down to near 0."""
    assert heatmap.max() == pytest.approx(1.0) and heatmap.min() < 0.2 and heatmap.std() > 0.1


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_single_forward_cam_equals_classic_grad_cam(torch_predictor, example):
    image = Image.open(example).convert("RGB")
    analysis = torch_predictor.analyse(image, heatmap=True)
    assert analysis.heatmap_label == analysis.prediction.top_label
    target = torch_predictor.labels.index(analysis.heatmap_label)
    assert_informative(analysis.heatmap)
    np.testing.assert_allclose(analysis.heatmap, hooked_grad_cam(torch_predictor, image, target), atol=1e-4)
    classic = classic_grad_cam(torch_predictor, image, analysis.heatmap_label)  # our own forward + backward
    np.testing.assert_allclose(analysis.heatmap, classic, atol=1e-4)


def test_heatmap_is_for_the_asked_class(torch_predictor):
    image = Image.open(EXAMPLES[0]).convert("RGB")
    top = torch_predictor.analyse(image, heatmap=True)
    others = list(top.prediction.probabilities)[1:]
    differences = []
    for label in (others[0], others[-1]):  # the runner-up and the least likely class
        other = torch_predictor.analyse(image, heatmap=True, label=label)
        assert other.heatmap_label == label and other.prediction == top.prediction  # same forward, other map
        target = torch_predictor.labels.index(label)
        np.testing.assert_allclose(other.heatmap, weights_times_features(torch_predictor, image, target), atol=1e-4)
        differences.append(np.abs(other.heatmap - top.heatmap).mean())
    top_target = torch_predictor.labels.index(top.prediction.top_label)
    np.testing.assert_allclose(top.heatmap, weights_times_features(torch_predictor, image, top_target), atol=1e-4)
    assert min(differences) > 0.05  # a map computed for the wrong class would be caught above


def test_onnx_backend_heatmap_equals_torch_backend(torch_predictor, onnx_predictor):
    assert CLASS_MAPS in onnx_predictor.forward.output_names and CLASS_MAPS in torch_predictor.forward.output_names
    for example in EXAMPLES:
        image = Image.open(example).convert("RGB")
        eager, onnx = torch_predictor.analyse(image), onnx_predictor.analyse(image)
        assert eager.heatmap_label == onnx.heatmap_label
        np.testing.assert_allclose(onnx.heatmap, eager.heatmap, atol=1e-3)
        assert max(abs(eager.prediction.probabilities[k] - v) for k, v in onnx.prediction.probabilities.items()) <= 1e-4


def heat_colours(picture: Image.Image, view: Image.Image) -> np.ndarray:
    """The colour layer of an overlay, recovered by undoing the blend with the model's view."""
    return (np.asarray(picture, dtype=np.float64) - (1 - ALPHA) * np.asarray(view, dtype=np.float64)) / ALPHA


def test_app_heatmap_picture_shows_a_real_map_for_the_top_class(onnx_predictor, tmp_path):
    classify = RequestHandler(onnx_predictor, outputs=OutputImages(folder=tmp_path))
    example = REPO / "examples" / "spiral_fracture.jpg"
    labels, _, shown, _ = classify(str(example), True)
    picture = Image.open(shown).convert("RGB")
    analysis = onnx_predictor.analyse(str(example))
    colours = heat_colours(picture, analysis.view)
    assert colours.std(axis=(0, 1)).max() > 30  # a zero or constant map gives one flat colour (std about 1)
    assert analysis.heatmap_label == next(iter(labels))
    for label in list(analysis.prediction.probabilities)[1:3]:  # another class gives a visibly other picture
        other = overlay_heatmap(analysis.view, onnx_predictor.analyse(str(example), label=label).heatmap)
        assert np.abs(np.asarray(other, dtype=float) - np.asarray(picture, dtype=float)).mean() > 5
    # the file is the overlay itself, up to JPEG's loss (a mean of about 1 grey level; another class's map differs by over 5)
    assert np.abs(np.asarray(overlay_heatmap(analysis.view, analysis.heatmap), dtype=float) - np.asarray(picture, dtype=float)).mean() <= 2


def test_a_flat_map_fails_these_checks(torch_predictor):
    """The checks above are not vacuous: a zero or a constant map is caught by each of them."""
    image = Image.open(EXAMPLES[0]).convert("RGB")
    analysis = torch_predictor.analyse(image)
    for flat in (np.zeros_like(analysis.heatmap), np.full_like(analysis.heatmap, 0.5)):
        with pytest.raises(AssertionError):
            assert_informative(flat)
        assert heat_colours(overlay_heatmap(analysis.view, flat), analysis.view).std(axis=(0, 1)).max() < 5
        assert not np.allclose(flat, analysis.heatmap, atol=1e-4)


def test_vit_gets_grad_cam_from_its_classifying_forward(tiny_vit):
    predictor = load_predictor(tiny_vit, "torch", ON_CPU, calibrated=False)
    # tokens, not a pooled feature map: no class maps, Grad-CAM with a backward pass
    assert CLASS_MAPS not in predictor.forward.output_names and predictor.grad_cam is not None and predictor.heatmaps_available
    image = Image.open(EXAMPLES[0]).convert("RGB")
    analysis = predictor.analyse(image)
    classic = classic_grad_cam(predictor, image, analysis.heatmap_label)
    assert analysis.heatmap.shape == (64, 64) and analysis.heatmap_label == analysis.prediction.top_label
    np.testing.assert_allclose(analysis.heatmap, classic, atol=1e-5)
    expected = predictor.predict(image).probabilities
    assert max(abs(expected[k] - v) for k, v in analysis.prediction.probabilities.items()) <= 1e-6
