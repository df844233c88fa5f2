"""Any Hub backbone, loaded as users load it: `bonebreak train --model <hub id>` reads the weights from the Hugging
Face cache a download left (tests/hub_cache.py: tiny random ViT, ConvNeXt, Swin and DINOv2 under their real ids),
offline; the trained folder then evaluates, predicts, serves (answer, text, heat map) and loads in a transformers
pipeline with no cache at all. `--push_to_hub` is checked with the Hub's HTTP calls replaced."""

from __future__ import annotations

import json
import socket
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import yaml

from bonebreak.commands import run
from bonebreak.common.checkpoint_format import ModelLoadError
from hub_cache import HUB_MODELS, use_hub_cache

FAMILIES = list(HUB_MODELS)
TRAIN = ["--epochs", "1", "--batch_size", "8", "--num_workers", "0"]


@pytest.fixture
def no_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache, offline: what serves must need nothing from the Hub."""
    use_hub_cache(monkeypatch, tmp_path / "empty_hf_home")
    return tmp_path / "empty_hf_home"


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, hub_home, handful, tmp_path_factory) -> tuple[str, Path]:
    """(Hub id, run folder): `bonebreak train --model <hub id>` for one epoch, offline, from the cache."""
    repo_id = HUB_MODELS[request.param][0]
    out = tmp_path_factory.mktemp("hub_runs") / request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_hub_cache(monkeypatch, hub_home)
        assert run("train", ["--data_dir", str(handful), "--model", repo_id, "--output_dir", str(out), *TRAIN]) == 0
    return repo_id, out


def test_the_cache_is_laid_out_as_a_download_leaves_it(hub_home, monkeypatch):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    use_hub_cache(monkeypatch, hub_home)
    scan = scan_cache_dir(hub_home / "hub")  # huggingface_hub's own reading of $HF_HOME/hub
    assert not scan.warnings
    assert {repo.repo_id for repo in scan.repos} == {repo_id for repo_id, _ in HUB_MODELS.values()}
    for repo in scan.repos:
        (revision,) = repo.revisions
        assert revision.refs == {"main"} and len(revision.commit_hash) == 40
        files = {f.file_name: f for f in revision.files}
        assert set(files) == {"config.json", "model.safetensors", "preprocessor_config.json"}
        weights = files["model.safetensors"]
        assert weights.file_path.is_symlink() and len(weights.blob_path.name) == 64  # LFS: the blob is named by its sha256
        assert try_to_load_from_cache(repo.repo_id, "model.safetensors") == str(weights.file_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_hub_id_loads_from_the_cache_and_only_from_it(family, hub_home, no_cache, monkeypatch):
    from bonebreak.models.factory import create_model

    repo_id = HUB_MODELS[family][0]
    with pytest.raises(ModelLoadError, match=f"hf download {repo_id}"):  # offline, nothing cached: a clear error
        create_model(repo_id, ["a", "b"])
    use_hub_cache(monkeypatch, hub_home)
    model, _ = create_model(repo_id, ["a", "b"])
    assert model.config.name_or_path == repo_id and model.config.id2label == {0: "a", 1: "b"}
    assert model.num_parameters() < 200_000  # the tiny copy in the cache (the real ones have millions)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_size_trains_saves_and_reloads_at_that_size(family, hub_home, monkeypatch, tmp_path):
    """--image_size on a Hub model: ViT-style position embeddings are resampled from the pretrained ones (ViT refused
    any other size; DINOv2 saved weights that did not load), so the saved folder takes that size and reloads alike."""
    import torch

    from bonebreak.models.checkpoints import load_checkpoint, save_checkpoint
    from bonebreak.models.factory import create_model, preprocess_config_of

    use_hub_cache(monkeypatch, hub_home)
    repo_id, size = HUB_MODELS[family][0], 112 if family == "swin" else 48  # Swin: each stage at least one 7-patch window
    model, processor = create_model(repo_id, ["a", "b"], image_size=size)
    table = getattr(model.base_model.embeddings, "position_embeddings", None)
    if table is not None:
        native = create_model(repo_id, ["a", "b"])[0].base_model.embeddings.position_embeddings
        assert table.shape[1] != native.shape[1] and torch.equal(table[:, 0], native[:, 0])  # resampled, not re-initialised
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    save_checkpoint(model, processor, tmp_path / "checkpoint")
    loaded, loaded_processor = load_checkpoint(tmp_path / "checkpoint")
    assert preprocess_config_of(loaded, loaded_processor).image_size == size
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, logits)


def test_training_by_hub_id_records_the_base_model(trained, handful):
    repo_id, folder = trained
    config = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert json.loads((folder / "metrics.json").read_text())["model"] == repo_id
    assert metadata["base_model"] == repo_id and f"Base model: `{repo_id}`" in card
    assert config["architectures"][0].endswith("ForImageClassification")
    assert (folder / "model.safetensors").stat().st_size < 1_000_000  # fine-tuned from the tiny copy in the cache
    labels = sorted(p.name for p in handful.iterdir() if p.is_dir())
    assert len(config["id2label"]) == len(labels) == 10  # the fresh head, not the checkpoint's 1000 ImageNet classes
    assert (folder / "model.onnx").is_file() and (folder / "xray_check.onnx").is_file()


def test_evaluate_and_predict(trained, handful, no_cache, tmp_path, capsys):
    from bonebreak.commands import evaluate, predict

    _, folder = trained
    metrics = evaluate.main(["--model_path", str(folder), "--data_dir", str(handful), "--split", "test", "--report_dir", str(tmp_path / "report")])
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n"] == 10 and 0 <= metrics["macro_f1"] <= 1
    image = next((handful / "Spiral Fracture" / "Test").iterdir())
    capsys.readouterr()
    assert predict.main(["--model_path", str(folder), "--format", "json", str(image)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    labels = set(json.loads((folder / "config.json").read_text())["id2label"].values())
    assert len(row["predictions"]) == 3 and {p["label"] for p in row["predictions"]} <= labels


def test_the_app_answers_with_a_heat_map(trained, handful, no_cache, tmp_path):
    """The commands' loader (ONNX Runtime for the answer, PyTorch for Grad-CAM): an answer, its text, and a heat map
    of the model's input size laid over the picture."""
    from PIL import Image

    from bonebreak.models.serving_backend import load_served
    from bonebreak.serving.ui import OutputImages, RequestHandler, heatmap_label

    _, folder = trained
    predictor = load_served(folder)
    assert "ONNX" in predictor.description and predictor.heatmaps_available
    assert heatmap_label(predictor) == "Show Grad-CAM heat map (where the model looked)"
    image = next((handful / "Spiral Fracture" / "Test").iterdir())
    analysis = predictor.analyse(str(image))
    size = predictor.preprocess.image_size
    assert analysis.heatmap is not None and analysis.heatmap.shape == (size, size)
    assert np.isfinite(analysis.heatmap).all() and analysis.heatmap.min() >= 0
    assert analysis.heatmap.max() == pytest.approx(1) and analysis.heatmap.std() > 0.05  # a map, not a blank (ViT's was all 0)
    assert analysis.heatmap_label == analysis.prediction.top_label
    labels, text, shown, _ = RequestHandler(predictor, outputs=OutputImages(tmp_path / "out"))(str(image))
    assert len(labels) == 3 and next(iter(labels)) == analysis.prediction.top_label and analysis.prediction.top_label in text
    assert Image.open(shown).size == (size, size)  # the model's view with the heat map over it
    without = RequestHandler(predictor, outputs=OutputImages(tmp_path / "plain"))(str(image), show_heatmap=False)
    assert without[2] != shown


def test_serving_without_pytorch_says_the_heat_map_is_not_available(trained, handful, no_cache, tmp_path):
    """ONNX Runtime alone (a Space): these heads have no class-map output, so the page says so and still answers."""
    from bonebreak.serving.loader import load_classifier
    from bonebreak.serving.ui import OutputImages, RequestHandler, heatmap_label

    _, folder = trained
    predictor = load_classifier(folder)  # no PyTorch forward offered
    assert not predictor.heatmaps_available
    assert heatmap_label(predictor).startswith("Heat map: not available for this model")
    image = next((handful / "Spiral Fracture" / "Test").iterdir())
    assert predictor.analyse(str(image)).heatmap is None
    labels, text, _, _ = RequestHandler(predictor, outputs=OutputImages(tmp_path / "out"))(str(image))
    assert len(labels) == 3 and next(iter(labels)) in text


def test_a_transformers_pipeline_loads_the_folder_and_agrees_with_the_app(trained, handful, no_cache):
    from transformers import pipeline

    from bonebreak.models.torch_backend import load_classifier

    _, folder = trained
    image = next((handful / "Spiral Fracture" / "Test").iterdir())
    answers = pipeline("image-classification", model=str(folder), device="cpu")(str(image), top_k=10)
    labels = set(json.loads((folder / "config.json").read_text())["id2label"].values())
    assert {a["label"] for a in answers} == labels and sum(a["score"] for a in answers) == pytest.approx(1, abs=1e-4)
    app = load_classifier(folder, backend="torch").predict(str(image)).probabilities
    assert {a["label"]: a["score"] for a in answers} == pytest.approx(app, abs=2e-3)  # same calibrated probabilities


# --- --push_to_hub, with the Hub replaced ------------------------------------------------------


class FakeHub:
    """Stands in for the Hub's write API; records every repo created and every file uploaded (with its bytes)."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.uploads: list[dict] = []  # one per upload_folder call: repo_id, commit message, {path in repo: bytes}

    def create_repo(self, api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append({"repo_id": repo_id, "token": token, "exist_ok": exist_ok, "repo_type": repo_type})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, commit_message=None, token=None,
                      allow_patterns=None, ignore_patterns=None, run_as_future=False, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        folder = Path(folder_path)
        ignore = ([ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])) + DEFAULT_IGNORE_PATTERNS
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        kept = filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore)  # as upload_folder selects
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        self.uploads.append({"repo_id": repo_id, "message": commit_message, "token": token, "extra": kwargs,
                             "files": {prefix + name: (folder / name).read_bytes() for name in kept}})
        url = f"https://huggingface.co/{repo_id}/commit/0"
        if run_as_future:
            done: Future = Future()
            done.set_result(url)
            return done
        return url


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's write calls go to a FakeHub; any other attempt to open a connection is recorded and fails."""
    import huggingface_hub

    from bonebreak.training import trainer

    hub, attempts = FakeHub(), []

    def refuse(sock, address):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no network ({address})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **k: hub.upload_folder(api, **k))
    # bonebreak calls huggingface_hub.upload_folder, a method bound to a module-level HfApi when huggingface_hub was
    # imported, so it is redirected through the (patched) class
    monkeypatch.setattr(trainer, "upload_folder", lambda **k: huggingface_hub.HfApi().upload_folder(**k))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ConnectionRefusedError):  # the guard works
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    attempts.clear()
    hub.network_attempts = attempts
    return hub


def test_push_to_hub_uploads_the_packaged_folder_and_nothing_else(fake_hub, hub_home, handful, monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, hub_home)
    repo_id, secret = "someone/bonebreak-test", "hf_testTokenThatMustNotBeUploaded"
    out = tmp_path / "pushed"
    assert run("train", ["--data_dir", str(handful), "--model", HUB_MODELS["vit"][0], "--output_dir", str(out), *TRAIN,
                         "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", secret]) == 0
    assert fake_hub.network_attempts == []
    assert [(r["repo_id"], r["token"], r["exist_ok"]) for r in fake_hub.repos] == [(repo_id, secret, True)]  # the Trainer's
    assert {u["repo_id"] for u in fake_hub.uploads} == {repo_id} and {u["token"] for u in fake_hub.uploads} == {secret}
    # Two commits: the Trainer's own push at the epoch's save (hub_strategy every_save; checkpoint-*/ not included), then
    # bonebreak's packaged folder on top of it.
    trainer_push, final = fake_hub.uploads
    assert trainer_push["message"] == "Training in progress, epoch 1"
    assert set(trainer_push["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json", "training_args.bin"}
    assert final["message"] == "BoneBreak: calibrated model, reports and model card"
    packaged = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(final["files"]) == packaged
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "model.onnx", "xray_check.onnx",
            "xray_check.safetensors", "calibration.json", "metrics.json"} <= packaged
    assert final["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()  # the calibrated weights
    assert yaml.safe_load(final["files"]["README.md"].decode().split("---")[1])["base_model"] == HUB_MODELS["vit"][0]
    repository = {}
    for upload in fake_hub.uploads:  # the repository as the Hub would hold it after both commits
        repository.update(upload["files"])
    assert set(repository) == packaged | {"training_args.bin"}  # the Trainer's weights and config overwritten
    leaked = [(u["message"], name) for u in fake_hub.uploads for name, data in u["files"].items() if secret.encode() in data]
    assert not leaked, f"the Hub token was uploaded: {leaked}"
