"""Classify X-ray files or folders without the UI: ``bonebreak predict PATH [PATH...]``.

A bad file becomes an error row and the rest carry on; the exit status is nonzero only for
a real failure (the model cannot be loaded, or no input path exists at all).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..common.argument_parser import argument_parser
from ..common.checkpoint_format import SHIPPED_MODEL, ModelLoadError
from ..serving.batch_predict import FORMATS, expand_paths, format_rows, predict_files
from ..serving.loader import BACKEND_HELP, check_backend
from ..serving.predictor import DEFAULT_UNSURE_BELOW
from ..models.serving_backend import load_served


@dataclass
class PredictArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder."})
    top_k: int = field(default=3, metadata={"help": "How many labels to show per image."})
    format: str = field(default="table", metadata={"help": "Output format: table, csv or json."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward pass."})
    unsure_below: float = field(
        default=DEFAULT_UNSURE_BELOW, metadata={"help": "Flag a prediction as unsure when its top probability is below this."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda if available)."})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(PredictArguments, prog="bonebreak predict", description=__doc__)
    parser.add_argument("paths", nargs="+", help="Image files (JPEG, PNG, DICOM, ...) or folders of them.")
    args, extra = parser.parse_args_into_dataclasses(args=argv)
    files, saw_folder = expand_paths(extra.paths)
    if not any(Path(p).exists() for p in extra.paths):
        print(f"error: none of the given paths exist: {' '.join(extra.paths)}", file=sys.stderr)
        return 2
    try:
        predictor = load_served(args.model_path, args.backend, args.device, unsure_below=args.unsure_below)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.model_path}: {predictor.description}", file=sys.stderr)
    rows = predict_files(predictor, files, args.top_k, args.batch_size, progress=saw_folder)
    print(format_rows(rows, args.format, args.top_k))
    return 0

