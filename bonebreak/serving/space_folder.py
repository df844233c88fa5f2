"""Write a self-contained Hugging Face Space that serves one checkpoint without the training stack
(``bonebreak export-space``).

The folder holds a small ``app.py``, the part of this package that it imports (found by reading the import
statements, so a new serving module travels without a list to keep up to date), the checkpoint's serving files
(its ONNX copies, labels, preprocessing and X-ray check, never the PyTorch weights), example X-rays with their
attribution, a README whose front matter Spaces read, and a ``requirements.txt`` pinning exactly the
distributions that code imports, at the versions installed here.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..common.checkpoint_format import (CONFIG_FILE, ENSEMBLE_FILE, ONNX_FILE, PREPROCESSOR_FILE, SIMILAR_CASES_FILE, XRAY_CHECK_FILE,
                                        XRAY_CHECK_ONNX)
from ..common.notices import RESEARCH_DEMO
from ..data.decode import IMAGE_SUFFIXES
from .checkpoint_info import ensemble_members
from .loader import load_classifier

logger = logging.getLogger(__name__)

PACKAGE = "bonebreak"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MODEL_DIR = "model"  # the checkpoint's serving files, inside the Space folder
CARD_FILE = "README.md"  # a checkpoint's model card; the Space's own README is written anew
SERVING_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, ONNX_FILE, XRAY_CHECK_FILE, XRAY_CHECK_ONNX, SIMILAR_CASES_FILE, ENSEMBLE_FILE, CARD_FILE)
APP_DOCSTRING = '"""BoneBreak Space: the checkpoint in model/ served on ONNX Runtime, no PyTorch (written by `bonebreak export-space`)."""'
SPACE_APP = f'''{APP_DOCSTRING}

import logging
from pathlib import Path

from bonebreak.serving.loader import load_classifier
from bonebreak.serving.ui import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(load_classifier(Path(__file__).resolve().with_name("{MODEL_DIR}"), backend="onnx"))
'''


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every absolute module name an import statement in ``source`` (the text of ``module``) may load, relative
    imports resolved; ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule). Imports inside
    functions count too: a serving module imports onnxruntime and pydicom lazily."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            # a module named at run time cannot be followed: the Space would miss it and fail on the first request
            raise ValueError(f"{module}, line {node.lineno}: a dynamic import; the Space's code must import what it runs by name")
    return names - {"__future__"}


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of one of this package's modules (``bonebreak.serving.ui`` -> .../serving/ui.py), else None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(entry_source: str, package_dir: Path = PACKAGE_DIR) -> tuple[list[Path], set[str]]:
    """What running ``entry_source`` can import: this package's files (each parent package's ``__init__.py``
    included, since Python runs it first) and the top-level names of the third-party modules they import."""
    files: set[Path] = set()
    third_party: set[str] = set()
    pending = [(entry_source, "__main__", False)]
    while pending:
        source, module, is_package = pending.pop()
        for name in imported_names(source, module, is_package):
            parts = name.split(".")
            if parts[0] != PACKAGE:
                if parts[0] not in sys.stdlib_module_names:
                    third_party.add(parts[0])
                continue
            for depth in range(1, len(parts) + 1):  # bonebreak, bonebreak.serving, bonebreak.serving.ui
                path = module_file(".".join(parts[:depth]), package_dir)
                if path is not None and path not in files:
                    files.add(path)
                    pending.append((path.read_text(), ".".join(parts[:depth]), path.name == "__init__.py"))
    return sorted(files), third_party


def pinned_requirements(modules: set[str]) -> list[str]:
    """``distribution==version`` for the installed distributions that provide these top-level modules."""
    providers = metadata.packages_distributions()
    missing = sorted(module for module in modules if module not in providers)
    if missing:
        raise ValueError(f"the serving code imports {', '.join(missing)}, which no installed distribution provides: "
                         "pip install -r requirements.txt")
    distributions = {distribution for module in modules for distribution in providers[module]}
    return sorted((f"{name}=={metadata.version(name)}" for name in distributions), key=str.lower)


def front_matter(base_model: str | None) -> str:
    """The YAML header Spaces read: SDK and its version (the Gradio installed here), Python version, entry point."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = ["---", "title: BoneBreak", "emoji: 🦴", "colorFrom: blue", "colorTo: gray", "sdk: gradio",
             f"sdk_version: {metadata.version('gradio')}", f'python_version: "{python}"', "app_file: app.py", "pinned: false",
             "license: apache-2.0"]
    if base_model:
        lines += ["models:", f"  - {base_model}"]
    lines += ["short_description: Fracture type from an X-ray (research demo, not a diagnostic device)", "---"]
    return "\n".join(lines)


def split_card(text: str) -> tuple[dict, str]:
    """A model card's front matter (as a dict) and its body."""
    import yaml

    if text.startswith("---\n"):
        header, _, body = text[4:].partition("\n---\n")
        return yaml.safe_load(header) or {}, body
    return {}, text


def demote_headings(markdown: str) -> str:
    """Each Markdown heading one level down (outside fenced code), so a model card sits under a section of a page."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.lstrip().startswith("```")
        lines.append(f"#{line}" if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def space_readme(card: str, examples: bool, similar_cases: bool = False) -> str:
    """The Space's page: the notice, what the Space holds, and the model card of the checkpoint it serves."""
    meta, body = split_card(card)
    base_model = meta.get("base_model")
    shipped = (f"`{MODEL_DIR}/` holds the model's ONNX files (`{ONNX_FILE}`, and `{XRAY_CHECK_ONNX}` with `{XRAY_CHECK_FILE}` for "
               "the check that an upload looks like an X-ray), its labels and preprocessing (`config.json`) and its model card; "
               "`bonebreak/` holds only the serving code (numpy, Pillow and ONNX Runtime; no PyTorch).")
    if similar_cases:
        shipped += (f" `{MODEL_DIR}/{SIMILAR_CASES_FILE}` holds small thumbnails of the model's training X-rays with their labels "
                    "and the model's features of them, to show the most similar ones beside each answer.")
    if examples:
        shipped += " `examples/` holds the example X-rays and their attribution (CC BY 4.0)."
    return "\n\n".join([front_matter(base_model if isinstance(base_model, str) else None), "# BoneBreak", RESEARCH_DEMO,
                        "Upload a bone X-ray to see which fracture type it most resembles, with a heat map of where the model looked.",
                        f"## What this Space holds\n\n{shipped} It was written by `bonebreak export-space`; the PyTorch weights "
                        "and the training code stay in the BoneBreak repository.",
                        f"## The model\n\n{demote_headings(body.strip()) if body.strip() else 'This checkpoint has no model card.'}"]) + "\n"


def checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """Space path -> source file for what the checkpoint folder serves with, its ensemble members included."""
    files = {f"{MODEL_DIR}/{name}": checkpoint / name for name in SERVING_FILES if (checkpoint / name).is_file()}
    for member in ensemble_members(checkpoint):  # at the same place inside the folder, as ensemble.json lists them
        where = member.relative_to(checkpoint).as_posix()
        files.update({f"{MODEL_DIR}/{where}/{name}": member / name for name in SERVING_FILES if (member / name).is_file()})
    return files


def example_files(examples_dir: Path | None) -> dict[str, Path]:
    """The example X-rays and the attribution beside them; none when there is no such folder."""
    if examples_dir is None:
        return {}
    if not examples_dir.is_dir():
        raise ValueError(f"--examples_dir {examples_dir} is not a folder (pass --examples_dir none for a Space without examples)")
    files = {f"examples/{p.name}": p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES or p.name == "ATTRIBUTION.md"}
    if files and "examples/ATTRIBUTION.md" not in files:
        raise ValueError(f"{examples_dir} has no ATTRIBUTION.md: say where the example images come from and under what license")
    return files


def code_files(package_dir: Path = PACKAGE_DIR) -> tuple[dict[str, Path], list[str]]:
    """The package files the Space's app imports, with each included package's data files (``fracture_info.json``),
    and the pinned requirements of the third-party modules they import."""
    files, third_party = import_closure(SPACE_APP, package_dir)
    copied = {f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}": path for path in files}
    for folder in {path.parent for path in files}:
        copied.update({f"{PACKAGE}/{data.relative_to(package_dir).as_posix()}": data for data in folder.iterdir()
                       if data.is_file() and data.suffix not in (".py", ".pyc")})
    return copied, pinned_requirements(third_party)


def is_space_folder(folder: Path) -> bool:
    app = folder / "app.py"
    return app.is_file() and app.read_text().startswith(APP_DOCSTRING)


def write_space(checkpoint: str | os.PathLike, output: str | os.PathLike, examples_dir: str | os.PathLike | None = "examples",
                license_file: str | os.PathLike | None = PACKAGE_DIR.parent / "LICENSE", overwrite: bool = False) -> dict[str, int]:
    """Write the Space folder for ``checkpoint`` at ``output``; returns each written file's size in bytes.

    The checkpoint must serve on ONNX Runtime (an up-to-date ``model.onnx``), which is checked by loading it.
    The folder is built beside ``output`` and moved into place at the end, so a failure leaves no half-written Space;
    an existing folder is replaced only with ``overwrite`` and only when it is an earlier export.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        if not overwrite:
            raise ValueError(f"--output {output} exists and is not empty: pass --overwrite to replace an earlier export, or another folder")
        if not is_space_folder(output):
            raise ValueError(f"--output {output} is not a folder written by export-space: refusing to replace it")
    try:
        load_classifier(checkpoint, backend="onnx")  # the Space runs exactly this: fail here, not on the Space
    except ValueError as error:
        raise ValueError(f"--model_path {checkpoint} cannot be served without PyTorch: {error}") from error
    code, requirements = code_files()
    files = {**code, **checkpoint_files(checkpoint), **example_files(Path(examples_dir) if examples_dir else None)}
    if license_file and Path(license_file).is_file():
        files["LICENSE"] = Path(license_file)
    card = checkpoint / CARD_FILE
    texts = {"app.py": SPACE_APP, "requirements.txt": "\n".join(["# What the Space's serving code imports, pinned (bonebreak export-space)",
                                                                   *requirements]) + "\n",
             "README.md": space_readme(card.read_text() if card.is_file() else "", any(p.startswith("examples/") for p in files),
                                       f"{MODEL_DIR}/{SIMILAR_CASES_FILE}" in files)}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    staging.chmod(0o755)  # mkdtemp makes it private; the Space folder is meant to be read and uploaded
    try:
        for name, source in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / name)
        for name, text in texts.items():
            (staging / name).write_text(text)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {p.relative_to(output).as_posix(): p.stat().st_size for p in sorted(output.rglob("*")) if p.is_file()}
