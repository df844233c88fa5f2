"""The package's shape: folders by job with their contracts (import-linter), the product apart from the lab,
serving without the training stack, no import hidden in a function to dodge a layer, small modules, thin
front doors, one console command, and package metadata that agrees with the pins."""

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
MAX_MODULES_PER_FOLDER = 12
# Lazy imports that are the point: the console command loads a command only when it runs, and a serving-only
# install (no PyTorch) must be able to run the app.
LAZY_IMPORTS_ALLOWED = {"commands/__init__.py", "models/serving_backend.py"}


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if ".venv" not in p.parts)


def lint_imports() -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    """`lint-imports` with the contracts in pyproject.toml: layers, the product never imports the lab, serving never
    imports training or the training stack."""
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = {name.strip() for layer in contracts[0]["layers"] for name in layer.split("|")}
    folders = {p.parent.name for p in package_files() if p.parent != PACKAGE}
    assert layers == folders, "every sub-package has its place in exactly one layer"


def test_every_folder_says_what_it_does_and_stays_small():
    for folder in {p.parent for p in package_files()} - {PACKAGE}:
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert len(docstring) > 40, f"{folder.name}/__init__.py needs a docstring saying what the folder is for"
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if folder.name == "commands":
            continue  # one module per subcommand, nothing else: test_commands_folder_holds_one_module_per_command
        assert len(modules) <= MAX_MODULES_PER_FOLDER, f"{folder.name}/ has {len(modules)} modules: split it by job"


def test_commands_folder_holds_one_module_per_command():
    from bonebreak.commands import COMMANDS

    modules = {p.stem for p in (PACKAGE / "commands").glob("*.py") if p.name != "__init__.py"}
    wanted = {module for module, _ in COMMANDS.values()}
    assert modules == wanted, (f"commands/ holds exactly one module per entry of COMMANDS: not commands {sorted(modules - wanted)}, "
                               f"missing {sorted(wanted - modules)}")


def test_no_package_import_is_hidden_inside_a_function():
    hidden = []
    for path in package_files():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in LAZY_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("bonebreak")):
                        hidden.append(f"{relative}:{inner.lineno} {node.name}() imports {inner.module}")
    assert not hidden, hidden


def test_modules_are_small_or_say_why():
    too_long = []
    for path in package_files():
        lines = path.read_text().splitlines()
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > MAX_LINES and "longer than" not in docstring.lower():
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(lines)} lines")
    assert not too_long, too_long


def test_commands_parse_arguments_and_call_the_library():
    """A command module holds its argument dataclass, main() and little else; the root scripts only call one."""
    from bonebreak.commands import COMMANDS

    for name, (module, _) in COMMANDS.items():
        path = PACKAGE / "commands" / f"{module}.py"
        tree = ast.parse(path.read_text())
        functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert "main" in functions, name
        assert len(functions) <= 3, f"commands/{module}.py defines {functions}: move the work into the library"
        assert len(path.read_text().splitlines()) <= 150, name
        assert 'if __name__ == "__main__"' not in path.read_text(), f"{module}: `bonebreak {name}` is the one way in"
    for script in ("app.py", "train.py"):
        code = [line for line in (REPO / script).read_text().splitlines() if line.strip() and not line.startswith(('"""', "#"))]
        assert len(code) <= 4 and any("bonebreak.commands" in line for line in code), f"{script} must stay a thin front door"


def test_bonebreak_help_lists_every_command_and_each_has_help():
    from bonebreak.commands import COMMANDS

    result = subprocess.run([sys.executable, "-m", "bonebreak", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert re.search(rf"^  {re.escape(name)}\s+\S", result.stdout, re.M), f"`bonebreak --help` does not list {name}"
    wrong = subprocess.run([sys.executable, "-m", "bonebreak", "evalute"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "bonebreak evaluate" in wrong.stderr  # a typo gets the nearest command


def test_version_comes_from_package_metadata():
    import bonebreak

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert bonebreak.__version__ == project["version"], "reinstall (pip install -e .) after a version bump"
    assert re.search(r"__version__\s*=\s*['\"]\d+\.\d", (PACKAGE / "__init__.py").read_text()) is None, "no second copy of the version"


def test_console_script_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"bonebreak": "bonebreak.commands:main"}


def test_pyproject_dev_extra_matches_requirements_dev():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [line.strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))]
    assert sorted(project["optional-dependencies"]["dev"]) == sorted(pins)
    assert project["dynamic"] == ["dependencies"]  # read from requirements.txt, never repeated


def test_no_code_edits_sys_path():
    for path in [*REPO.glob("*.py"), *package_files(), *(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        if path.name != Path(__file__).name:
            assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path


def test_argument_parsing_has_no_side_effects(monkeypatch):
    """Parsing training arguments decides nothing about the machine: device and precision come from the training
    set-up (bonebreak.training.setup), which parsing never calls. (Transformers' own TrainingArguments sets up the
    device when constructed; given use_cpu, as the set-up passes it, that asks nothing of CUDA either.)"""
    import torch

    from bonebreak.training import setup
    from bonebreak.training.arguments import parse_arguments

    def touched(*args, **kwargs):
        raise AssertionError("argument parsing asked the machine about its device")

    for name in ("machine_defaults", "for_this_machine", "resolve_precision", "cpu_has_native_bf16", "new_run_dir"):
        monkeypatch.setattr(setup, name, touched)
    monkeypatch.setattr(torch.cuda, "is_available", touched)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", touched)
    _, _, args = parse_arguments(["--output_dir", "somewhere", "--precision", "auto"], defaults={"use_cpu": True})
    assert (args.bf16, args.fp16, args.output_dir) == (False, False, "somewhere")  # precision: decided when training starts


def option_helps(text: str) -> list[str]:
    """The help of each option of an argparse --help text, one string per option (continuation lines joined)."""
    blocks: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
    return blocks


def test_every_command_has_help_with_each_default_shown_once(capsys):
    import pytest

    from bonebreak.commands import COMMANDS, run

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            run(name, ["--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith(f"usage: bonebreak {name}"), name
        assert len(option_helps(text)) >= 2, name
        for block in option_helps(text):
            defaults = re.findall(r"\(default: ([^)]*)\)", block)
            assert len(defaults) == len(set(defaults)), f"bonebreak {name} --help repeats a default: {block}"
            assert "(default: None)" not in block or len(defaults) == 1, f"bonebreak {name}: a second, empty default: {block}"
