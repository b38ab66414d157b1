"""Is one finetuned model's mask AP really above another's? A paired bootstrap over images (issue 12; BENCHMARKS.md).

    python benchmarks/casp_ap_bootstrap.py <run-dir> data/partworld-demo/eval --reference finetune \\
        --others no-pretraining,specific-finetune --tag eval [--resamples 200]

Reads the COCO results files the run's evaluation stages wrote (``<run>/datasets/predictions-<stage>-<tag>/``
``images.json`` + ``results.json``) and the split's ground truth, and resamples the images with replacement (a
duplicate is a new image id with the same objects and predictions), the same resample for every model. Each
resample is scored with pycocotools' COCOeval (segm, class-specific, as ``evaluate-instances``); the 2.5th-97.5th
percentiles of the reference's AP minus each other's are the 95% interval. With no resampling the figure equals the
stage's ``eval/mask_AP``, which the script checks.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.data import shards  # noqa: E402
from trainers.evaluation.instances import _pycoco  # noqa: E402


def load(run: Path, stage: str, tag: str) -> dict[str, list[dict]]:
    """Image key -> its predictions (segmentation, score, category_id)."""
    d = run / "datasets" / f"predictions-{stage}-{tag}"
    images = {im["id"]: im["file_name"] for im in json.loads((d / "images.json").read_text())["images"]}
    out: dict[str, list[dict]] = {k: [] for k in images.values()}
    for r in json.loads((d / "results.json").read_text()):
        out[images[r["image_id"]]].append(r)
    return out


def mask_ap(keys: list[str], gt: dict[str, dict], preds: dict[str, list[dict]], categories: list[dict]) -> float:
    """COCOeval segm AP of the images ``keys`` (repeats allowed: each occurrence is its own image)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dts = [], [], []
    for i, k in enumerate(keys, 1):
        rec = gt[k]
        images.append({"id": i, "height": rec["height"], "width": rec["width"]})
        for o in rec["objects"]:
            rle = _pycoco(o["segmentation"])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(o["category_id"]), "segmentation": o["segmentation"],
                         "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "iscrowd": int(o.get("iscrowd", 0))})
        for r in preds.get(k, []):
            dts.append({"image_id": i, "category_id": r["category_id"], "segmentation": r["segmentation"], "score": r["score"]})
    if not dts:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dts), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--reference", default="finetune")
    ap.add_argument("--others", default="no-pretraining,specific-finetune")
    ap.add_argument("--tag", default="eval")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    index = shards.DatasetIndex.load(a.split)
    gt = {k: r for k, _, r in shards.iter_samples(a.split, decode=False, allow_parts=True)}
    keys = list(gt)
    stages = [a.reference, *a.others.split(",")]
    preds = {s: load(a.run, s, a.tag) for s in stages}
    out = {"split": str(a.split), "resamples": a.resamples, "ap": {}, "diff": {}}
    for s in stages:
        out["ap"][s] = mask_ap(keys, gt, preds[s], index.categories)
        reported = json.loads((a.run / f"{s}-{a.tag}" / "result.json").read_text())["metrics"]["eval/mask_AP"]
        if abs(out["ap"][s] - reported) > 1e-4:  # results.json rounds scores to 6 decimals
            sys.exit(f"{s}: recomputed AP {out['ap'][s]:.6f} differs from the reported {reported:.6f}")
        print(f"{s:20s} mask AP {100 * out['ap'][s]:5.2f} (reported {100 * reported:5.2f})", flush=True)
    rng = np.random.default_rng(a.seed)
    diffs = {s: [] for s in stages[1:]}
    for i in range(a.resamples):
        sample = [keys[j] for j in rng.integers(0, len(keys), size=len(keys))]
        ref = mask_ap(sample, gt, preds[a.reference], index.categories)
        for s in stages[1:]:
            diffs[s].append(ref - mask_ap(sample, gt, preds[s], index.categories))
    for s in stages[1:]:
        lo, hi = np.percentile(diffs[s], [2.5, 97.5])
        d = out["ap"][a.reference] - out["ap"][s]
        out["diff"][s] = {"diff": d, "ci95": [float(lo), float(hi)], "share_above_0": float(np.mean(np.array(diffs[s]) > 0))}
        print(f"{a.reference} - {s:20s} {100 * d:+5.2f}  95% CI [{100 * lo:+5.2f}, {100 * hi:+5.2f}]"
              f"{'  (not significant)' if lo <= 0 <= hi else ''}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
