"""The exported Space against the full install, measured side by side in one run (not a unit test).

    python -m benchmarks.space [--model_path checkpoints/bone_break_model] [--starts 5] [--requests 30] [--workdir DIR]

1. Writes the Space folder (``bonebreak export-space``) and builds two virtual environments from empty ones in
   WORKDIR: the Space's (``pip install -r space/requirements.txt``) and the full install's (``pip install -r
   requirements.txt``); each is measured with ``du``. A venv already there from the same requirements file is reused
   (the JSON says so); its size is measured all the same.
2. Start-up: each app is started STARTS times, the two alternating (after one untimed start each, so the disk cache
   is warm for both), timing process start to the first ``/predict`` answer through ``gradio_client``.
3. Requests: both apps running at once, REQUESTS ``/predict`` calls to each over the examples, in turn (which app goes
   first alternates), so a change in the machine's load falls on both; p50 and p95.

Targets (issue 29): Space venv <= 1 GB; Space first answer <= 0.5x the full install's; Space request p50 <= 1.0x the
full app's. Writes benchmarks/results/space/<time>.json and a bar chart (.png) beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from benchmarks.records import write_report
from benchmarks.timing import percentiles_ms
from bonebreak.common.checkpoint_format import SHIPPED_MODEL

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))


def build_venv(folder: Path, requirements: Path) -> bool:
    """An empty venv with ``requirements`` installed; True when installed now, False when reused from an earlier run."""
    stamp = folder / "requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    print(f"installing {requirements} into {folder} ...", flush=True)
    subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", "-r", str(requirements)], check=True)
    stamp.write_text(digest)
    return True


def size_gb(folder: Path) -> float:
    return int(subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0]) / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_app(python: Path, cwd: Path, log: Path) -> Iterator[tuple[float, Any]]:
    """Start ``python app.py`` in ``cwd``; yields the seconds from process start to its first ``/predict`` answer and a
    ``gradio_client`` connected to it; the app is stopped on exit."""
    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([str(python), "app.py"], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{cwd}/app.py exited during start-up:\n{log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(handle_file(str(EXAMPLES[0])), True, api_name="/predict")
        yield time.perf_counter() - started, client
    finally:
        process.terminate()
        process.wait(timeout=30)


def request_seconds(client: Any, index: int) -> float:
    from gradio_client import handle_file

    begun = time.perf_counter()
    client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), True, api_name="/predict")
    return time.perf_counter() - begun


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = ("full", "space")
    panels = (("venv_gb", "installed size (GB)", 1.0), ("first_answer_median_s", "start to first answer (s, median)", None),
              ("request_p50_ms", "request p50 (ms)", None))
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for axis, (key, title, target) in zip(axes, panels):
        values = [report[side][key] for side in sides]
        axis.bar(["full install", "Space folder"], values, color=["#888888", "#3a78c2"])
        for x, value in enumerate(values):
            axis.text(x, value, f"{value:.2f}", ha="center", va="bottom")
        if target:
            axis.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}")
            axis.legend(loc="upper right")
        axis.set_title(title)
    figure.suptitle(f"Space vs full install ({report['machine']['cpus']} CPUs, same run)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=SHIPPED_MODEL, help="Checkpoint the two apps serve (default: %(default)s).")
    parser.add_argument("--starts", type=int, default=5, help="Timed cold starts of each app (default: %(default)s).")
    parser.add_argument("--requests", type=int, default=30, help="Sequential requests timed after the last start (default: %(default)s).")
    parser.add_argument("--workdir", default="/tmp/bonebreak-space-benchmark", help="Where the two venvs and the Space folder go.")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/space/<time>.json).")
    args = parser.parse_args(argv)
    if args.starts < 1 or args.requests < 1:
        parser.error("--starts and --requests must be at least 1")
    from bonebreak.serving.space_folder import write_space

    workdir = Path(args.workdir)
    space = workdir / "space"
    write_space(REPO / args.model_path if not Path(args.model_path).is_absolute() else args.model_path, space, REPO / "examples", overwrite=True)
    venvs = {"full": (workdir / "venv-full", REPO / "requirements.txt", REPO), "space": (workdir / "venv-space", space / "requirements.txt", space)}
    installed = {side: build_venv(folder, requirements) for side, (folder, requirements, _) in venvs.items()}
    report: dict = {"model_path": args.model_path, "starts": args.starts, "requests": args.requests,
                    "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()}}
    for side, (folder, _, _) in venvs.items():
        report[side] = {"venv_gb": round(size_gb(folder), 3), "installed_this_run": installed[side]}
    report["space"]["folder_mb"] = round(size_gb(space) * 1e3, 1)

    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    for side, (folder, _, cwd) in venvs.items():  # untimed: warms the disk cache for both
        with started_app(folder / "bin" / "python", cwd, logs / f"{side}-warmup.log"):
            pass
    starts: dict[str, list[float]] = {"full": [], "space": []}
    for run in range(args.starts):
        for side, (folder, _, cwd) in venvs.items():
            with started_app(folder / "bin" / "python", cwd, logs / f"{side}-{run}.log") as (seconds, _):
                starts[side].append(seconds)
            print(f"start {run + 1}/{args.starts} {side}: first answer after {seconds:.2f} s", flush=True)
    # Requests: both apps up at once and asked in turn, so drift in the machine's load falls on both alike.
    requests: dict[str, list[float]] = {"full": [], "space": []}
    with started_app(venvs["full"][0] / "bin" / "python", venvs["full"][2], logs / "full-requests.log") as (_, full), \
            started_app(venvs["space"][0] / "bin" / "python", venvs["space"][2], logs / "space-requests.log") as (_, space_client):
        for index in range(args.requests):
            for side, client in (("full", full), ("space", space_client)) if index % 2 else (("space", space_client), ("full", full)):
                requests[side].append(request_seconds(client, index))
    for side in venvs:
        report[side].update({"first_answer_s": [round(s, 2) for s in starts[side]], "first_answer_median_s": round(statistics.median(starts[side]), 2),
                             **{f"request_{k}": v for k, v in percentiles_ms(requests[side]).items()}})
    report["ratios"] = {
        "space_venv_gb (target <= 1.0)": report["space"]["venv_gb"],
        "first_answer space/full (target <= 0.5)": round(report["space"]["first_answer_median_s"] / report["full"]["first_answer_median_s"], 3),
        "request_p50 space/full (target <= 1.0)": round(report["space"]["request_p50_ms"] / report["full"]["request_p50_ms"], 3),
        "venv space/full": round(report["space"]["venv_gb"] / report["full"]["venv_gb"], 3),
    }
    path = write_report(report, args.out, str(REPO / "benchmarks/results/space"))
    plot(report, path.with_suffix(".png"))
    print(f"plot: {path.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
