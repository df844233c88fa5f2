"""benchmarks/gpu.py, run on the CPU: the GPU check must not find its bugs on borrowed GPU time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.gpu import inference_report, write_random_init
from benchmarks.records import write_report
from bonebreak.data.loading import image_paths, load_splits


def test_inference_report_times_both_batches_and_the_cpu_onnx_backend(trained_vit, handful, tmp_path):
    model = Path(shutil.copytree(trained_vit, tmp_path / "vit"))  # the ONNX copy it writes must not reach the shared fixture
    files = image_paths(load_splits(handful).splits["train"])
    report = inference_report(str(model), files, device="cpu", batch=8)
    assert report["device"] == "cpu" and report["backend"] == "inference backend PyTorch (cpu)"
    for timing in (report["batch_1"]["predict"], report["batch_1"]["bare_forward"], report["cpu_onnx_batch_1"]["predict"]):
        assert 0 < timing["p50_ms"] <= timing["p95_ms"]
    assert report["batch_8"]["predictions_images_per_second"] > 0 and report["batch_8"]["bare_forward_images_per_second"] > 0
    assert (model / "model.onnx").is_file()
    json.dumps(report)  # written as the JSON record
    with pytest.raises(ValueError, match="at least 64 images"):
        inference_report(str(model), files[:10], device="cpu")


def test_random_init_rejects_unknown_architectures(tmp_path):
    with pytest.raises(ValueError, match="--arch must be one of convnext_tiny, vit_base"):
        write_random_init("resnet", tmp_path / "x")


def test_reports_are_printed_and_filed_under_the_time(tmp_path, capsys):
    path = write_report({"a": 1}, None, str(tmp_path / "gpu"), "-inference")
    assert path.parent == tmp_path / "gpu" and path.name.endswith("-inference.json") and json.loads(path.read_text()) == {"a": 1}
    assert f"written to {path}" in capsys.readouterr().out
    assert write_report({"b": 2}, str(tmp_path / "x.json"), "unused") == tmp_path / "x.json"
