"""A Hugging Face cache laid out exactly as a download leaves it, holding tiny random models under real Hub ids.

``hf download`` (and ``from_pretrained("<org>/<name>")`` on a connected machine) writes
``<cache>/models--<org>--<name>/`` with ``blobs/<etag>`` (the git blob SHA-1 of a small file, the SHA-256 of
an LFS file such as ``model.safetensors``), ``snapshots/<40-hex commit>/<file>`` as relative symlinks to those
blobs, and ``refs/main`` holding the commit (no newline). With ``HF_HUB_OFFLINE=1``, ``huggingface_hub`` resolves
``refs/main`` and reads the snapshot, which is what users get once the weights are cached.

The models are reduced-size, randomly initialised copies of each repository's architecture, saved the way the
real repository is (a bare ``ViTModel`` / ``Dinov2Model`` without a head, an ImageNet classifier with 1000 labels)
with the real repository's image processor settings at a small size, so a fine-tune meets the same config
and preprocessing formats (legacy ``"size": 224``, ``crop_pct``, shortest edge + centre crop).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")  # stored through LFS on the Hub: blob named by the SHA-256


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a small file: its Hub etag, and the name of its blob in the cache."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def revision_of(repo_id: str) -> str:
    """A fixed 40-hex commit id per repository (the cache only needs it to be one)."""
    return hashlib.sha1(f"bonebreak-test:{repo_id}".encode()).hexdigest()


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str | None = None) -> Path:
    """Write ``files`` into ``cache`` (the ``$HF_HOME/hub`` folder) as a download of ``repo_id`` at ``revision``
    on ``main`` does; returns the snapshot folder."""
    revision = revision or revision_of(repo_id)
    repo = repo_folder(cache, repo_id)
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def _saved(model, processor: dict) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    files["preprocessor_config.json"] = json.dumps(processor, indent=2).encode()
    return files


def _vit() -> dict[str, bytes]:
    from transformers import ViTConfig, ViTModel

    # google/vit-base-patch16-224-in21k: a bare ViTModel (pooler, no head); its processor file predates size dicts
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return _saved(ViTModel(config), {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 32})


def _imagenet_labels() -> dict:
    return {"id2label": {str(i): f"class_{i}" for i in range(1000)}, "label2id": {f"class_{i}": i for i in range(1000)}}


def _convnext() -> dict[str, bytes]:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # facebook/convnext-tiny-224: an ImageNet-1k classifier; resize to size / crop_pct, then centre crop
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=64, **_imagenet_labels())
    return _saved(ConvNextForImageClassification(config), {
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True, "feature_extractor_type": "ConvNextFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3, "size": 64})


def _swin() -> dict[str, bytes]:
    from transformers import SwinConfig, SwinForImageClassification

    # microsoft/swin-tiny-patch4-window7-224: an ImageNet-1k classifier, patch 4, window 7 (here 56 px: 14 x 14 patches)
    config = SwinConfig(image_size=56, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=7, **_imagenet_labels())
    return _saved(SwinForImageClassification(config), {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3, "size": 56})


def _dinov2() -> dict[str, bytes]:
    from transformers import Dinov2Config, Dinov2Model

    # facebook/dinov2-small: a bare Dinov2Model whose position embeddings (518 px there, 98 here) are interpolated
    # to the processor's smaller crop (224 there, 56 here)
    config = Dinov2Config(image_size=98, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2)
    return _saved(Dinov2Model(config), {
        "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN, "image_processor_type": "BitImageProcessor",
        "image_std": IMAGENET_STD, "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 64}})


# family -> (real Hub id, builder of the tiny random copy's files)
HUB_MODELS: dict[str, tuple[str, Callable[[], dict[str, bytes]]]] = {
    "vit": ("google/vit-base-patch16-224-in21k", _vit),
    "convnext": ("facebook/convnext-tiny-224", _convnext),
    "swin": ("microsoft/swin-tiny-patch4-window7-224", _swin),
    "dinov2": ("facebook/dinov2-small", _dinov2),
}


def build_hub_cache(hf_home: Path, families: list[str] | None = None) -> dict[str, str]:
    """``$HF_HOME/hub`` holding each family's tiny model under its real id; returns family -> Hub id."""
    import torch

    ids = {}
    for family in families or list(HUB_MODELS):
        repo_id, build = HUB_MODELS[family]
        torch.manual_seed(0)
        add_to_cache(Path(hf_home) / "hub", repo_id, build())
        ids[family] = repo_id
    return ids


def use_hub_cache(monkeypatch, hf_home: Path) -> None:
    """Point huggingface_hub (hence transformers) at ``$HF_HOME/hub``, offline. The library reads ``HF_HOME`` once at
    import, so its constants are patched too (the environment is for subprocesses)."""
    from huggingface_hub import constants

    hub = str(Path(hf_home) / "hub")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
