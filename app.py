"""BoneBreak web demo: `python app.py` (see --help). Also the Hugging Face Space entry point."""

import logging
import os
import sys
from dataclasses import dataclass, field, replace


from bonebreak.cli import parse
from bonebreak.images import DEFAULT_LIMITS, DecodeLimits
from bonebreak.inference import BACKEND_HELP, DEFAULT_UNSURE_BELOW, Predictor, check_backend
from bonebreak.models import SHIPPED_MODEL, ModelLoadError
from bonebreak.ui import build_demo, launch, serving_threads


@dataclass
class AppArguments:
    model_path: str = field(default=SHIPPED_MODEL, metadata={"help": "Checkpoint folder to serve."})
    host: str = field(
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        metadata={"help": "Interface to bind (default $GRADIO_SERVER_NAME, else 127.0.0.1; use 0.0.0.0 to expose it)."},
    )
    port: int = field(
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        metadata={"help": "Port (default $GRADIO_SERVER_PORT, else 7860)."},
    )
    unsure_below: float = field(
        default=DEFAULT_UNSURE_BELOW, metadata={"help": "Say 'unsure' when the top probability is below this."}
    )
    concurrency: int = field(default=2, metadata={"help": "Predictions run at once (2 suits a 2-core CPU)."})
    max_upload_mb: int = field(default=20, metadata={"help": "Largest upload accepted, in MB."})
    max_image_megapixels: float = field(
        default=DEFAULT_LIMITS.max_pixels / 1e6, metadata={"help": "Refuse images with more pixels than this (decompression bombs)."}
    )

    backend: str = field(
        default="auto",
        metadata={"help": BACKEND_HELP},
    )

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
        if self.concurrency < 1 or self.max_upload_mb < 1 or self.max_image_megapixels <= 0:
            raise ValueError("--concurrency, --max_upload_mb and --max_image_megapixels must be positive")

    def decode_limits(self) -> DecodeLimits:
        return replace(DEFAULT_LIMITS, max_bytes=self.max_upload_mb * 1024 * 1024, max_pixels=int(self.max_image_megapixels * 1e6))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse(AppArguments)
        predictor = Predictor.from_checkpoint(args.model_path, unsure_below=args.unsure_below, limits=args.decode_limits(), backend=args.backend)
    except (ModelLoadError, ValueError) as error:
        sys.exit(f"error: {error}")
    logging.getLogger("app").info("PyTorch threads: %d", serving_threads(predictor))
    launch(build_demo(predictor), args.host, args.port, args.concurrency, args.max_upload_mb)


if __name__ == "__main__":
    main()
