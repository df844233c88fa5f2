"""Model registry, offline ImageNet weights, Hub/local loading and checkpoint safety."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from bonebreak.common.checkpoint_format import ModelLoadError
from bonebreak.models.checkpoints import load_checkpoint, save_checkpoint
from bonebreak.models.factory import available_models, create_model, efficientnet_lite, preprocess_config_of
from bonebreak.training.augment import eval_transform

LABELS = ["Avulsion", "Greenstick", "Spiral"]


def imagenet_top5(model, processor, image: Image.Image) -> list[str]:
    import timm.data

    cfg = preprocess_config_of(model, processor)
    with torch.no_grad():
        logits = model.eval()(pixel_values=eval_transform(cfg)(image)[None]).logits[0]
    info = timm.data.ImageNetInfo()
    return [info.index_to_description(int(i)) for i in logits.topk(5).indices]


def test_efficientnet_lite0_weights_are_mapped_correctly():
    """The packaged ImageNet weights must recognise ImageNet things, or the mapping is wrong."""
    from bonebreak.evaluation.xray_check_quality import PHOTOS_DIR

    model, processor = efficientnet_lite(0)
    assert preprocess_config_of(model, processor).mean == (0.5, 0.5, 0.5)
    coffee = imagenet_top5(model, processor, Image.open(PHOTOS_DIR / "coffee.jpg").convert("RGB"))
    cat = imagenet_top5(model, processor, Image.open(PHOTOS_DIR / "chelsea.jpg").convert("RGB"))
    assert coffee[0] == "espresso"
    assert any("cat" in name for name in cat[:2])


def test_registry_builds_new_head_and_image_size():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(available_models())
    model, processor = create_model("efficientnet_lite0", LABELS, image_size=160)
    assert model.config.id2label == {0: "Avulsion", 1: "Greenstick", 2: "Spiral"}
    assert preprocess_config_of(model, processor).image_size == 160
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(2, 3, 160, 160)).logits.shape == (2, 3)
    reference, _ = efficientnet_lite(0)
    torch.testing.assert_close(model.timm_model.conv_stem.weight, reference.timm_model.conv_stem.weight)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="at least 2 labels"):
        create_model("efficientnet_lite0", ["Only"])
    with pytest.raises(ValueError, match="--image_size"):
        create_model("efficientnet_lite0", LABELS, image_size=8)


def test_missing_hub_model_says_how_to_supply_a_folder():
    with pytest.raises(ModelLoadError, match="local folder.*--local-dir"):
        create_model("someone/no-such-vit-model", LABELS)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_convnext"])
def test_local_folder_models_get_our_labels(request, fixture, tmp_path):
    model, processor = create_model(str(request.getfixturevalue(fixture)), LABELS, image_size=64)
    assert model.config.label2id == {"Avulsion": 0, "Greenstick": 1, "Spiral": 2}
    cfg = preprocess_config_of(model, processor)
    assert cfg.image_size == 64
    save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded, loaded_processor = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.id2label[2] == "Spiral"
    assert preprocess_config_of(loaded, loaded_processor) == cfg
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


def test_checkpoint_is_replaced_atomically_and_errors_name_the_file(tmp_path):
    model, processor = create_model("efficientnet_lite0", LABELS, image_size=64)
    target = tmp_path / "ckpt"
    save_checkpoint(model, processor, target, extra_files={"metrics.json": "{}"})
    save_checkpoint(model, processor, target, extra_files={"metrics.json": '{"v": 2}'})
    assert json.loads((target / "metrics.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old folders left

    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    weights = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_checkpoint(target)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"pickle would go here")
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_checkpoint(target)
    (target / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="config.json is corrupt"):
        load_checkpoint(target)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tiny_vit", "tiny_convnext"])
def test_temperature_folded_into_the_head_divides_the_logits(request, name):
    from bonebreak.evaluation.calibration import fold_temperature

    model, _ = create_model(name if name.startswith("efficientnet") else str(request.getfixturevalue(name)), LABELS, image_size=64)
    model.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
        assert fold_temperature(model, 1.7) and fold_temperature(model, 2.0)  # a recalibration folds on top
        after = model(pixel_values=pixels).logits
    assert torch.allclose(after, before / 3.4, atol=1e-5)
    assert model.config.bonebreak_temperature == 1.0 and model.config.bonebreak_temperature_folded == pytest.approx(3.4)
