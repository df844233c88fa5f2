"""The package's shape: layered imports (import-linter), no import hidden in a function to dodge
a cycle, small modules, thin front doors, and package metadata that agrees with the pins."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "bonebreak"
MAX_LINES = 350
FRONT_DOORS = {"add_member", "audit", "calibrate", "check_data", "evaluate", "experiments", "export", "label_issues", "model_card", "predict"}


def modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def test_layer_contract_holds():
    """`lint-imports` with the contract in pyproject.toml: every import points down a layer."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout
    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    assert named == set(modules()), "every module of the package has its place in exactly one layer"


def test_no_sibling_import_is_hidden_inside_a_function():
    hidden = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("bonebreak")):
                        hidden.append(f"{name}.py:{inner.lineno} {node.name}() imports .{inner.module}")
    assert not hidden, hidden


def test_modules_are_small_or_say_why():
    too_long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > MAX_LINES and "longer than" not in docstring.lower():
            too_long.append(f"{name}.py: {len(lines)} lines")
    assert not too_long, too_long


def test_front_doors_parse_arguments_and_call_the_library():
    """A command module holds its argument dataclass, main() and little else; nobody imports it."""
    for name in FRONT_DOORS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert "main" in functions, name
        assert len(functions) <= 3, f"{name}.py is a front door but defines {functions}: move the work into the library"
        assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 150, name
    for path in [*modules().values(), REPO / "app.py", REPO / "train.py"]:
        imported = re.findall(r"^from (?:\.|bonebreak\.)(\w+) import", path.read_text(), re.M)
        assert not FRONT_DOORS & set(imported), f"{path.name} imports a command module: {FRONT_DOORS & set(imported)}"


def test_pyproject_dev_extra_matches_requirements_dev():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [line.strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))]
    assert sorted(project["optional-dependencies"]["dev"]) == sorted(pins)
    assert project["dynamic"] == ["dependencies"]  # read from requirements.txt, never repeated


def test_no_code_edits_sys_path():
    for path in [*REPO.glob("*.py"), *PACKAGE.glob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        if path.name != Path(__file__).name:
            assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path
