"""Where benchmark scripts write their JSON: one place, so every script prints and files it alike."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | None, folder: str, suffix: str = "") -> Path:
    """Print ``report`` and write it to ``out``, or to ``<folder>/<time><suffix>.json`` when ``out`` is None."""
    path = Path(out or f"{folder}/{time.strftime('%Y-%m-%dT%H%M%S')}{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {path}")
    return path
