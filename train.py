"""Train a fracture classifier: `python train.py` or `accelerate launch train.py` (see --help)."""

import sys

from bonebreak.training import main

if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad flags or data: one clear line instead of a traceback
        sys.exit(f"error: {error}")
