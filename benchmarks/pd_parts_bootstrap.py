"""Paired bootstrap over eval images of the class-specific part metrics of two predictions folders (issue 11;
BENCHMARKS.md "Self-training rounds that improve, and the fair baselines").

    python benchmarks/pd_parts_bootstrap.py data/partworld-demo/eval \
        .selftrain/runs/<run>/datasets/predictions-f1-evaluate \
        .selftrain/runs/<run>/datasets/predictions-kmeans-detected-evaluate --setting pred --resamples 500

Both folders are what evaluate-parts (or ``selftrain predict``) writes. Each image's prediction is scored once into
its own contingency tables (``PartClusteringEvaluator``, the evaluator of the stage); a resample of the images (with
replacement, the same resample for both folders) adds up those tables and computes NMI, ARI and mIoU (majority and
Hungarian) from the sums, so every resample is scored exactly as the stage scores the whole split. The point estimate
on all images is checked against ``score_part_results`` (the figures the stage reported). Prints A - B with a 95%
percentile interval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("nmi", "ari", "miou", "miou_hungarian")


def per_image(dataset: str, folder: Path, setting: str) -> dict[str, object]:
    """Image key -> a PartClusteringEvaluator holding that image's counts only."""
    from trainers.data import shards
    from trainers.evaluation import PartClusteringEvaluator, PartProposalRecall
    from trainers.evaluation.part_predictions import read_part_results, score_part_prediction

    doc, preds = read_part_results(folder)
    if setting not in preds:
        raise SystemExit(f"{folder}: no setting {setting!r} (it has {', '.join(preds)})")
    by_key = {im["file_name"]: i for i, im in enumerate(doc["images"])}
    out = {}
    for key, _, record in shards.iter_samples(dataset, decode=False, allow_parts=True):
        if key in by_key:
            ev = PartClusteringEvaluator()
            score_part_prediction(ev, PartProposalRecall(max_dets=doc["max_dets"]), record, preds[setting][by_key[key]],
                                  gt_objects=setting in doc["gt_class_map"])
            out[key] = ev
    return out


def score(evaluators: list) -> dict[str, float]:
    from trainers.evaluation import PartClusteringEvaluator

    total = PartClusteringEvaluator()
    for ev in evaluators:
        total.merge(ev)
    m = total.evaluate()
    return {k: m[k] for k in METRICS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("a", type=Path, help="predictions folder A")
    ap.add_argument("b", type=Path, help="predictions folder B")
    ap.add_argument("--setting", default="gt", choices=("gt", "pred"))
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", type=Path, default=None, help="write the result as JSON here")
    a = ap.parse_args()
    from trainers.evaluation.part_predictions import score_part_results

    ea, eb = per_image(a.dataset, a.a, a.setting), per_image(a.dataset, a.b, a.setting)
    keys = sorted(set(ea) & set(eb))
    if len(keys) != len(ea) or len(keys) != len(eb):
        raise SystemExit(f"the folders cover different images ({len(ea)} and {len(eb)}, {len(keys)} shared)")
    point = {name: score([e[k] for k in keys]) for name, e in (("a", ea), ("b", eb))}
    for name, folder in (("a", a.a), ("b", a.b)):  # the sums reproduce the stage's own figures
        reported = score_part_results(a.dataset, folder)
        for k in METRICS:
            if abs(reported[f"eval/{a.setting}/{k}"] - point[name][k]) > 1e-9:
                raise SystemExit(f"{folder}: {k} {point[name][k]} differs from the stage's {reported[f'eval/{a.setting}/{k}']}")
    rng = np.random.default_rng(a.seed)
    diffs = {k: [] for k in METRICS}
    for _ in range(a.resamples):
        idx = rng.integers(0, len(keys), len(keys))
        sa, sb = score([ea[keys[i]] for i in idx]), score([eb[keys[i]] for i in idx])
        for k in METRICS:
            diffs[k].append(sa[k] - sb[k])
    result = {"dataset": a.dataset, "a": str(a.a), "b": str(a.b), "setting": a.setting, "images": len(keys),
              "resamples": a.resamples, "seed": a.seed, "a_metrics": point["a"], "b_metrics": point["b"], "a_minus_b": {}}
    print(f"{len(keys)} images, setting {a.setting}, {a.resamples} resamples; A = {a.a.name}, B = {a.b.name}")
    for k in METRICS:
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        d = point["a"][k] - point["b"][k]
        result["a_minus_b"][k] = {"diff": d, "ci95": [float(lo), float(hi)]}
        print(f"{k:15s} A {100 * point['a'][k]:5.1f}  B {100 * point['b'][k]:5.1f}  A - B {100 * d:+5.2f} "
              f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
