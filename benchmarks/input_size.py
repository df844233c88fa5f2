"""Does a larger input help? The selection protocol's paired macro-F1 gain of each input-size recipe over the
224 px baseline, with its 95% t interval, beside the CPU latency of that model's app request (not a unit test).

    python -m benchmarks.input_size --latency 224=benchmarks/results/speed/A.json 320=benchmarks/results/speed/B.json

Recipes are those in recipes/ whose only change is ``--image_size`` (res320, res384, ...); the gains come from the
CV records in benchmarks/results/ exactly as docs/experiments.md's protocol table computes them. Each ``--latency``
is a ``benchmarks/speed.py --only_app`` report of a model at that size (its app request p50 and the bare forward's).
Writes docs/experiments_input_size.png and prints the points as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bonebreak.lab.results_table import load_records, paired_gains  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE_SIZE = 224


def size_recipes(recipes_dir: Path) -> dict[str, int]:
    """recipe name -> input size, for the recipes that change nothing but the input size."""
    sizes = {}
    for path in sorted(recipes_dir.glob("*.json")):
        recipe = json.loads(path.read_text())
        if set(recipe) == {"image_size"}:
            sizes[path.stem] = int(recipe["image_size"])
    return sizes


def app_request_ms(report: Path) -> dict[str, float]:
    latency = json.loads(report.read_text())["app"]["latency"]
    return {"app_request_p50_ms": latency["app_request"]["p50_ms"], "bare_forward_p50_ms": latency["bare_forward_onnx"]["p50_ms"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", nargs="*", default=[], help="SIZE=speed-report.json pairs, measured in one session.")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks/results"))
    parser.add_argument("--out", default=str(REPO / "docs/experiments_input_size.png"))
    args = parser.parse_args(argv)
    latency = {int(size): app_request_ms(Path(path)) for size, path in (item.split("=", 1) for item in args.latency)}
    sizes = size_recipes(REPO / "recipes")
    records = [r for r in load_records(args.results_dir) if r["kind"].startswith("cv")]
    points = [{"recipe": "baseline", "size": BASE_SIZE, "gain": 0.0, "t_interval": [0.0, 0.0], "differences": [], "pairs": 0, "verdict": "-"}]
    for row in paired_gains(records):
        if row["recipe"] in sizes and row["note"] is None:
            f1 = row["gains"]["macro_f1"]
            points.append({"recipe": row["recipe"], "size": sizes[row["recipe"]], "gain": f1["gain"], "t_interval": list(f1["t_interval"]),
                           "differences": list(f1["differences"]), "pairs": f1["pairs"], "verdict": f1["verdict"], "adopt": f1["adopt"]})
    for point in points:
        point.update(latency.get(point["size"], {}))

    figure, (gain_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for point in points:
        low, high = point["t_interval"]
        gain_axis.errorbar(point["size"], point["gain"], yerr=[[point["gain"] - low], [high - point["gain"]]], fmt="D", capsize=5,
                           color="tab:green" if point.get("adopt") else "tab:grey")
        gain_axis.scatter([point["size"]] * len(point["differences"]), point["differences"], s=10, color="black", alpha=0.5)
        gain_axis.annotate(f"{point['recipe']}\n{point['pairs']} pairs" if point["pairs"] else "baseline", (point["size"], point["gain"]),
                           textcoords="offset points", xytext=(8, -4), fontsize=8)
    gain_axis.axhline(0, color="black", linewidth=0.8)
    gain_axis.set(xlabel="input size (px)", ylabel="paired macro-F1 gain over 224 px", title="Gain (5-fold CV pairs, 95% t interval)")
    timed = [p for p in points if "app_request_p50_ms" in p]
    if timed:
        time_axis.bar([str(p["size"]) for p in timed], [p["app_request_p50_ms"] for p in timed], color="tab:blue", label="app request p50")
        time_axis.bar([str(p["size"]) for p in timed], [p["bare_forward_p50_ms"] for p in timed], color="tab:orange", label="bare ONNX forward p50")
        time_axis.set(xlabel="input size (px)", ylabel="ms (2-core CPU)", title="CPU latency (benchmarks/speed.py --only_app)")
        time_axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(json.dumps(points, indent=2))
    print(f"plot: {args.out}")
    return points


if __name__ == "__main__":
    main()
