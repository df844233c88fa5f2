"""Serve the web demo (Gradio) on a checkpoint: ``bonebreak app`` or ``python app.py`` (the Space's entry point)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..common.argument_parser import parse
from ..common.checkpoint_format import SHIPPED_MODEL
from ..data.decode import DEFAULT_LIMITS, DecodeLimits
from ..serving.feedback import DEFAULT_MAX_FLAGS, DEFAULT_MAX_MB, FeedbackStore
from ..serving.loader import BACKEND_HELP, check_backend
from ..serving.predictor import DEFAULT_UNSURE_BELOW
from ..serving.ui import DEFAULT_CONCURRENCY, DEFAULT_MAX_UPLOAD_MB, serve
from ..models.serving_backend import load_served


@dataclass
class AppArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to serve."})
    host: str | None = field(
        default=None, metadata={"help": "Interface to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1; use 0.0.0.0 to expose it)."}
    )
    port: int | None = field(default=None, metadata={"help": "Port (default: $GRADIO_SERVER_PORT, else 7860)."})
    unsure_below: float = field(
        default=DEFAULT_UNSURE_BELOW, metadata={"help": "Say 'unsure' when the top probability is below this."}
    )
    concurrency: int = field(default=DEFAULT_CONCURRENCY, metadata={"help": "Predictions run at once (2 suits a 2-core CPU)."})
    max_upload_mb: int = field(default=DEFAULT_MAX_UPLOAD_MB, metadata={"help": "Largest upload accepted, in MB."})
    max_image_megapixels: float = field(
        default=DEFAULT_LIMITS.max_pixels / 1e6, metadata={"help": "Refuse images with more pixels than this (decompression bombs)."}
    )
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})
    feedback_dir: str | None = field(
        default=None, metadata={"help": "Let visitors flag answers as right, wrong (with the right type) or not an X-ray, and store each "
                                "flagged image with its verdict here (off by default: the page then stores nothing; "
                                "`bonebreak feedback` reviews the folder)."})
    feedback_max_flags: int = field(default=DEFAULT_MAX_FLAGS, metadata={"help": "Most flags --feedback_dir keeps; then new ones are refused."})
    feedback_max_mb: float = field(default=DEFAULT_MAX_MB, metadata={"help": "Most megabytes --feedback_dir may hold; then new flags are refused."})

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
        if self.concurrency < 1 or self.max_upload_mb < 1 or self.max_image_megapixels <= 0:
            raise ValueError("--concurrency, --max_upload_mb and --max_image_megapixels must be positive")
        if self.feedback_max_flags < 1 or self.feedback_max_mb <= 0:
            raise ValueError("--feedback_max_flags and --feedback_max_mb must be positive")

    def decode_limits(self) -> DecodeLimits:
        return replace(DEFAULT_LIMITS, max_bytes=self.max_upload_mb * 1024 * 1024, max_pixels=int(self.max_image_megapixels * 1e6))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(AppArguments, argv, "bonebreak app", __doc__)
    predictor = load_served(args.model_path, args.backend, unsure_below=args.unsure_below, limits=args.decode_limits())
    feedback = None if args.feedback_dir is None else FeedbackStore(
        Path(args.feedback_dir), Path(args.model_path).resolve().name, predictor.labels, args.feedback_max_flags,
        int(args.feedback_max_mb * 1024 * 1024))
    serve(predictor, args.host, args.port, args.concurrency, args.max_upload_mb, feedback)
