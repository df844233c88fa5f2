"""Bounded load test of the Gradio app on loopback (not a unit test).

Starts ``python app.py`` on a free 127.0.0.1 port, then N client threads send prediction
requests through ``gradio_client`` until the request budget or the time limit is reached,
and prints requests served, errors, p50/p95 latency and the server's memory before/after.

    python benchmarks/load_test.py --requests 500 --clients 8 --max_seconds 900
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LoadArguments:
    model_path: str = field(default="checkpoints/bone_break_model", metadata={"help": "Checkpoint the app serves."})
    requests: int = field(default=500, metadata={"help": "Total prediction requests to send (the budget)."})
    warmup: int = field(default=64, metadata={"help": "Requests sent (and not counted) before memory is first measured."})
    server_log: str | None = field(default=None, metadata={"help": "Write the server's output here (default: discard)."})
    clients: int = field(default=8, metadata={"help": "Concurrent client threads."})
    max_seconds: float = field(default=900.0, metadata={"help": "Stop sending after this many seconds, whatever is left."})
    heatmap: bool = field(default=True, metadata={"help": "Ask for the Grad-CAM heat map too (the app's default)."})
    json_out: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of the server process and its children, from /proc."""
    total = 0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()] if Path(f"/proc/{pid}").exists() else []
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def start_server(model_path: str, port: int, log: str | None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    output = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "app.py", "--model_path", model_path, "--port", str(port)], cwd=REPO, env=env,
                               stdout=output, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit("app.py exited during start-up")
            time.sleep(0.5)
    process.kill()
    raise SystemExit("app.py did not start within 180 s")


def run_clients(url: str, args: LoadArguments, images: list[Path], on_progress=None) -> tuple[list[float], list[str], float]:
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    remaining = [args.requests]
    stop_at = time.time() + args.max_seconds

    def worker(index: int) -> None:
        client = Client(url, verbose=False)
        n = index
        while time.time() < stop_at:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            started = time.perf_counter()
            try:
                labels, _, _, _ = client.predict(handle_file(str(images[n % len(images)])), args.heatmap, api_name="/predict")
                if len(labels["confidences"]) != 3:
                    raise ValueError(f"expected 3 labels, got {labels}")
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if on_progress is not None:
                        on_progress(len(latencies) + len(errors))
            except Exception as error:  # count every failure, keep going
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
            n += args.clients

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(LoadArguments).parse_args_into_dataclasses(args=argv)
    images = sorted((REPO / "examples").glob("*.jpg"))
    port = free_port()
    server = start_server(args.model_path, port, args.server_log)
    memory_trace: list[tuple[int, float]] = []
    quarter = max(args.requests // 4, 1)
    try:
        url = f"http://127.0.0.1:{port}/"
        # Warm-up at full concurrency first: allocator pools and per-thread buffers grow to
        # their working size once; growth after that is what a leak would look like.
        run_clients(url, LoadArguments(requests=args.warmup, clients=args.clients, heatmap=args.heatmap), images)
        memory_before = rss_mib(server.pid)
        trace = lambda done: memory_trace.append((done, round(rss_mib(server.pid), 1))) if done % quarter == 0 else None
        latencies, errors, seconds = run_clients(url, args, images, on_progress=trace)
        memory_after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures = {
        "requests_sent": len(latencies) + len(errors),
        "served": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(latencies) / seconds, 2) if seconds else 0.0,
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "server_rss_mib_before": round(memory_before, 1),
        "server_rss_mib_after": round(memory_after, 1),
        "server_rss_growth_mib": round(memory_after - memory_before, 1),
        "server_rss_mib_during": memory_trace,
    }
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
