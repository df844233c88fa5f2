"""How benchmark scripts time a call: warm-up first, then one wall-clock time per input, as p50/p95."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 2), "p95_ms": round(float(np.percentile(seconds, 95)) * 1e3, 2)}


def time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 5,
               sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per ``fn(item)`` over ``inputs``, after ``fn`` ran on the first ``warmup`` of them. ``sync`` waits for
    queued device work (``torch.cuda.synchronize`` on a GPU), so each time covers the work and not only its launch."""
    for item in inputs[:warmup]:
        fn(item)
    sync()
    seconds = []
    for item in inputs:
        started = time.perf_counter()
        fn(item)
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds
