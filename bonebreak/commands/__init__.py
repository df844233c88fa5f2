"""The one front door: ``bonebreak <command> [flags]`` (also ``python -m bonebreak``).

Each command is a module here with a ``main(argv)``, imported only when it runs, so ``bonebreak --help``
and a serving-only install never load the training stack. ``python app.py`` and ``train.py`` call ``run``.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

# name -> (module, one line for `bonebreak --help`); the product first, then the lab's tools
COMMANDS = {
    "app": ("app", "serve the web demo (Gradio) on a checkpoint"),
    "predict": ("predict", "classify X-ray files or folders from the command line"),
    "train": ("train", "fine-tune a model on a data folder, then calibrate, evaluate and package it"),
    "evaluate": ("evaluate", "score a checkpoint on a data folder's splits, with 95% intervals"),
    "check-data": ("check_data", "show what a data folder holds and how it will be split"),
    "audit": ("audit", "find near-duplicate images and write leak-free grouped splits"),
    "calibrate": ("calibrate", "refit a checkpoint's temperature and X-ray check on its validation split"),
    "export": ("export", "write a checkpoint's ONNX files (model.onnx, xray_check.onnx)"),
    "export-space": ("export_space", "write a Hugging Face Space folder that serves a checkpoint without PyTorch"),
    "model-card": ("model_card", "re-evaluate a checkpoint and rewrite its model card"),
    "add-member": ("add_member", "make a checkpoint an ensemble by adding another trained model"),
    "feedback": ("feedback", "review the app's feedback folder, then turn accepted flags into extra training images"),
    "label-issues": ("label_issues", "rank likely label errors from cross-validation (cleanlab)"),
    "experiments": ("experiments", "lab: run recipes under the paired repeated-CV protocol, regenerate docs/experiments.md"),
}


def usage() -> str:
    from .. import __version__

    width = max(map(len, COMMANDS))
    lines = [f"BoneBreak {__version__}: fracture-type classification of bone X-rays (a research demo, not a diagnostic device).",
             "", "usage: bonebreak <command> [flags]      bonebreak <command> --help shows a command's flags and defaults", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def run(name: str, argv: Sequence[str] | None = None) -> int:
    """Run one command; a ValueError (bad flag, data or checkpoint) is one line naming the problem, not a traceback."""
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    try:
        result = module.main(list(sys.argv[1:] if argv is None else argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"bonebreak {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name.replace("_", "-"), COMMANDS, n=1)
        hint = f" (did you mean `bonebreak {close[0]}`?)" if close else ""
        print(f"error: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(name, argv[1:])
