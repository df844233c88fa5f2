"""Every runtime command works with requirements.txt alone.

Runtime code is every ``bonebreak/**/*.py``, ``app.py`` and ``train.py``. These tests run the real
train / evaluate / predict commands in subprocesses in which every package that only
requirements-dev.txt brings in cannot be imported (as if only requirements.txt were installed).
That requirements.txt pins exactly what runtime code imports is tests/test_requirements_pins.py.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_requirements_pins import normalise, pins

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "bone-break-mini"


# --- runtime commands with dev-only packages unimportable ------------------------------------


def _closure(requirements: set[str]) -> set[str]:
    """Installed distributions the given ones need, transitively (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    done: set[tuple[str, frozenset]] = set()
    todo = [(normalise(name), frozenset()) for name in requirements]
    while todo:
        key, extras = todo.pop()
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            requires = metadata.distribution(key).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-specific dependency)
        seen.add(key)
        for line in requires:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((normalise(requirement.name), frozenset(requirement.extras)))
    return seen


def dev_only_modules() -> list[str]:
    """Top-level modules of the distributions that requirements-dev.txt brings in and requirements.txt does not."""
    runtime = _closure(set(pins(REPO / "requirements.txt")))
    dev_only = _closure(set(pins(REPO / "requirements-dev.txt"))) - runtime
    modules = {module for module, distributions in metadata.packages_distributions().items()
               if {normalise(d) for d in distributions} & dev_only and not {normalise(d) for d in distributions} & runtime}
    return sorted(modules)


BLOCKER = '''
"""Written by tests/test_requirements.py: dev-only packages cannot be imported in this process."""
import importlib.util
import sys

BLOCKED = frozenset({blocked!r})


class _DevOnlyBlocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (dev-only package, blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _DevOnlyBlocker())
_find_spec = importlib.util.find_spec


def find_spec(name, package=None):  # "is it installed?" probes see it as missing, as they would
    if name.partition(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)


importlib.util.find_spec = find_spec
'''


@pytest.fixture(scope="module")
def blocked_python(tmp_path_factory):
    """Run ``python ARGS`` from the repo root with every dev-only module unimportable."""
    blocked = dev_only_modules()
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=blocked)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("BONEBREAK_DATA", None)

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    run.blocked = blocked
    return run


def check(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed ({result.returncode}) without dev-only packages:\n{result.stderr[-4000:]}"


def test_blocker_hides_dev_only_packages(blocked_python):
    assert "pytest" in blocked_python.blocked
    assert not {"torch", "transformers", "numpy", "PIL", "yaml", "scipy"} & set(blocked_python.blocked)
    probe = blocked_python("-c", textwrap.dedent("""
        import importlib.util
        import numpy, torch, transformers  # runtime packages still import
        assert importlib.util.find_spec("pytest") is None
        try:
            import pytest
        except ModuleNotFoundError as error:
            print("blocked:", error)
        else:
            raise SystemExit("pytest imported despite the blocker")
    """))
    check(probe, "the blocker probe")
    assert "blocked: No module named 'pytest'" in probe.stdout


def test_train_evaluate_predict_without_dev_packages(blocked_python, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    test_images = sorted(FIXTURE.glob("*/Test/*.jpg"))
    assert test_images, f"the committed real-X-ray fixture {FIXTURE} is missing"

    tiny = tmp_path / "tiny_vit"
    config = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tiny)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tiny)
    run = tmp_path / "run"  # must not exist: train.py refuses a non-empty output folder

    check(blocked_python("train.py", "--data_dir", str(FIXTURE), "--model", str(tiny), "--epochs", "1", "--batch_size", "8",
                         "--num_workers", "0", "--output_dir", str(run)), "train.py")
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert (run / name).is_file(), f"training wrote no {name}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "ood" not in metrics  # renamed in 0.6
    xray_check = metrics["xray_check"]
    assert xray_check and xray_check["n_photos"] >= 15 and 0.0 <= xray_check["auroc_photos_vs_xrays"] <= 1.0
    assert (run / "xray_check.safetensors").is_file() and (run / "xray_check.onnx").is_file()

    report = tmp_path / "report"
    check(blocked_python("-m", "bonebreak", "evaluate", "--model_path", str(run), "--data_dir", str(FIXTURE), "--split", "test",
                         "--report_dir", str(report)), "python -m bonebreak evaluate")
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion_matrix.json", "confusion_matrix.png", "xray_check.json"):
        assert (report / name).is_file(), f"the evaluation report has no {name}"
    assert json.loads((report / "metrics.json").read_text())["n"] == len(test_images)

    folder = next(p for p in sorted(FIXTURE.iterdir()) if (p / "Test").is_dir()) / "Test"
    predicted = blocked_python("-m", "bonebreak", "predict", str(folder), "--model_path", str(run), "--format", "json")
    check(predicted, "python -m bonebreak predict")
    rows = json.loads(predicted.stdout)
    images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    assert sorted(row["path"] for row in rows) == images
    assert all(row["error"] is None and len(row["predictions"]) == 3 and row["xray_check"] in ("passed", "failed") for row in rows)
