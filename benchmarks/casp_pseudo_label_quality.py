"""Diagnosis of a CaSP run's pseudo-labels against the unlabeled split's ground truth (which the method never reads).

    python benchmarks/casp_pseudo_label_quality.py <run>/datasets/pseudo-labels ../data/casp-demo-gt/unlabeled
    python benchmarks/casp_pseudo_label_quality.py <run>/datasets/pseudo-labels-specific ../data/casp-demo-gt/unlabeled specific
    NMS=0.5 python benchmarks/casp_pseudo_label_quality.py ...   # the same after a greedy mask NMS at IoU 0.5

Prints counts, precision and recall at mask IoU 0.5 (greedy matching in score order), the share of pseudo-labels
overlapping another of the same image at IoU >= 0.5 (duplicates), the score histogram and, for class-specific ones,
the share of matched pseudo-labels with the right class (BENCHMARKS.md "CaSP demo: Table 2").
"""

import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.data import shards  # noqa: E402

pseudo, gt_dir = sys.argv[1], sys.argv[2]
cls_agn = len(sys.argv) < 4 or sys.argv[3] != "specific"
NMS = float(os.environ.get("NMS", "0"))
gt = {k: r.get("objects", []) for k, _, r in shards.iter_samples(gt_dir, decode=False)}


def enc(rles):
    return [
        {"size": list(r["size"]), "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]} for r in rles
    ]


n_img = n_pl = n_gt = tp = dup = 0
cls_ok = 0
scores, ious_best, per_img, gt_per_img = [], [], [], []
gt_in_kept = 0
for k, _, r in shards.iter_samples(pseudo, decode=False):
    pl = r.get("proposals", [])
    g = gt[k]
    n_img += 1
    n_pl += len(pl)
    gt_in_kept += len(g)
    per_img.append(len(pl))
    gt_per_img.append(len(g))
    scores += [p["score"] for p in pl]
    if not pl:
        continue
    d = enc([p["segmentation"] for p in pl])
    if NMS:
        si = mu.iou(d, d, [0] * len(d))
        keep = []
        for i in range(len(pl)):
            if all(si[i, j] <= NMS for j in keep):
                keep.append(i)
        n_pl -= len(pl) - len(keep)
        pl = [pl[i] for i in keep]
        d = [d[i] for i in keep]
        scores = scores[: len(scores) - len(per_img and [0]) * 0]
    if g:
        iou = mu.iou(d, enc([o["segmentation"] for o in g]), [0] * len(g))  # [n_pl, n_gt]
        # greedy matching by score order (pl is best first) at IoU 0.5
        used = set()
        for i in range(len(pl)):
            j = int(np.argmax(iou[i]))
            ious_best.append(float(iou[i, j]))
            cand = [jj for jj in np.argsort(-iou[i]) if iou[i, jj] >= 0.5 and jj not in used]
            if cand:
                used.add(cand[0])
                tp += 1
                if not cls_agn and pl[i].get("category_id") == g[cand[0]]["category_id"]:
                    cls_ok += 1
    if len(pl) > 1:
        self_iou = mu.iou(d, d, [0] * len(d))
        np.fill_diagonal(self_iou, 0)
        dup += int((self_iou.max(1) >= 0.5).sum())
total_gt = sum(len(v) for v in gt.values())
out = {
    "images_in_Dp": n_img,
    "images_in_Du": len(gt),
    "pseudo_labels": n_pl,
    "gt_objects_in_Du": total_gt,
    "gt_objects_on_kept_images": gt_in_kept,
    "labels_per_kept_image": n_pl / max(1, n_img),
    "gt_per_image_in_Du": total_gt / max(1, len(gt)),
    "precision@0.5": tp / max(1, n_pl),
    "recall@0.5 (of all D^u gt)": tp / max(1, total_gt),
    "labels_overlapping_another_label_iou>=0.5": dup / max(1, n_pl),
    "median_score": statistics.median(scores) if scores else None,
    "score_hist": np.histogram(scores, bins=10, range=(0, 1))[0].tolist(),
    "median_best_iou": statistics.median(ious_best) if ious_best else None,
}
if not cls_agn:
    out["class_correct_among_matched"] = cls_ok / max(1, tp)
print(json.dumps(out, indent=1))
