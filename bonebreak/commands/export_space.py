"""Write a Hugging Face Space folder that serves a checkpoint without PyTorch: ``bonebreak export-space``.

Then ``hf upload YOUR_USER/SPACE space/ --repo-type space`` deploys it. The folder installs only gradio,
onnxruntime, numpy, Pillow and what else the serving code imports (its ``requirements.txt``), so the Space
builds in well under a gigabyte and starts without importing the training stack.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ..common.argument_parser import parse
from ..common.checkpoint_format import EXPORT_COMMAND, SHIPPED_MODEL
from ..serving.space_folder import write_space


@dataclass
class ExportSpaceArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": f"Checkpoint folder to serve; it needs an up-to-date model.onnx "
                                                                     f"(`{EXPORT_COMMAND.format('DIR')}` writes it)."})
    output: str = field(default="space", metadata={"help": "Folder to write the Space into (created; must be empty or an earlier export)."})
    examples_dir: str = field(default="examples", metadata={"help": "Example X-rays shown under the upload, with their ATTRIBUTION.md; "
                                                                    "'none' for a Space without examples."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the output folder when it holds an earlier export."})


def main(argv: list[str] | None = None) -> dict[str, int]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(ExportSpaceArguments, argv, "bonebreak export-space", __doc__)
    examples = None if args.examples_dir.lower() == "none" else args.examples_dir
    sizes = write_space(args.model_path, args.output, examples, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "files": len(sizes), "megabytes": round(sum(sizes.values()) / 1e6, 1),
                      "requirements": (f"{args.output}/requirements.txt"),
                      "upload": f"hf upload YOUR_USER/bonebreak {args.output} --repo-type space"}, indent=2))
    return sizes
