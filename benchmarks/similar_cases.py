"""How good are the similar cases as an answer of their own? A plain k-nearest-neighbour vote over the checkpoint's
similar-cases index (its Train images), beside the classifier, on clean Test (not a unit test).

    python -m benchmarks.similar_cases [--model_path checkpoints/bone_break_model] [--data_dir DIR] [--k 1 3 6 10]

For each k: top-1 and top-3 accuracy of the vote and of the classifier on the same images with 95% percentile
bootstrap intervals, and the paired difference (vote minus classifier) with its interval. Clean Test holds the
published Test images that have no near-copy in Train (``bonebreak audit``), so a vote cannot win by finding a
copy of the test image. The shown answer is the classifier's: the vote is measured, not shipped (a change of the
answer goes through the selection protocol). Writes benchmarks/results/similar_cases/<time>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.records import write_report
from bonebreak.common.checkpoint_format import SHIPPED_MODEL
from bonebreak.data.layouts import resolve_data_dir
from bonebreak.data.loading import image_paths, label_index_map, load_splits
from bonebreak.data.splits import Split
from bonebreak.serving.loader import load_predictor

REPO = Path(__file__).resolve().parent.parent


def top_k_hits(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    return (np.argsort(-scores, axis=1, kind="stable")[:, :k] == targets[:, None]).any(axis=1)


def interval(values: np.ndarray, resamples: np.ndarray) -> dict[str, float | list[float]]:
    means = values[resamples].mean(axis=1)
    return {"value": round(float(values.mean()), 3), "ci95": [round(float(q), 3) for q in np.percentile(means, [2.5, 97.5])]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=SHIPPED_MODEL, help="Checkpoint with a similar_cases.safetensors (default: %(default)s).")
    parser.add_argument("--data_dir", default=None, help="The dataset folder (default: $BONEBREAK_DATA, else data/bone-break).")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 6, 10], help="Neighbours in the vote (default: %(default)s).")
    parser.add_argument("--resamples", type=int, default=2000, help="Bootstrap resamples (default: %(default)s).")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/similar_cases/<time>.json).")
    args = parser.parse_args(argv)
    predictor = load_predictor(args.model_path, "onnx", xray_check=False)
    if predictor.similar_cases is None:
        parser.error(f"{args.model_path} has no similar-cases index: `bonebreak export --model_path {args.model_path} --similar_cases`")
    data = load_splits(resolve_data_dir(args.data_dir))
    split = str(Split.CLEAN_TEST) if str(Split.CLEAN_TEST) in data.splits else str(Split.TEST)
    paths = image_paths(data.splits[split])
    to_model = label_index_map(data.labels, predictor.labels)
    targets = np.array([to_model[label] for label in data.splits[split]["label"]])
    probabilities = predictor.probabilities(paths)
    embeddings = predictor.embeddings(paths)
    resamples = np.random.default_rng(0).integers(0, len(paths), (args.resamples, len(paths)))
    report = {"model_path": args.model_path, "split": split, "images": len(paths), "cases": len(predictor.similar_cases.names),
              "leaky": split != str(Split.CLEAN_TEST), "classifier": {}, "vote": {}}
    for top in (1, 3):
        report["classifier"][f"top{top}"] = interval(top_k_hits(probabilities, targets, top).astype(float), resamples)
    for k in args.k:
        votes = predictor.similar_cases.vote(embeddings, k)
        report["vote"][f"k={k}"] = {}
        for top in (1, 3):
            vote_hits = top_k_hits(votes, targets, top).astype(float)
            difference = vote_hits - top_k_hits(probabilities, targets, top).astype(float)
            report["vote"][f"k={k}"][f"top{top}"] = interval(vote_hits, resamples)
            report["vote"][f"k={k}"][f"top{top}_minus_classifier"] = interval(difference, resamples)
    write_report(report, args.out, str(REPO / "benchmarks/results/similar_cases"))
    return report


if __name__ == "__main__":
    main()
