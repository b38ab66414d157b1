"""Are a LUSS run's mIoU differences real? Chance level, paired bootstrap and the fine-tuned model's fit to its labels
(issue 13; BENCHMARKS.md "PASS / LUSS").

    python benchmarks/luss_significance.py <run-dir> <split-dir> --tag eval [--fit-images 200]

From the predictions the run's ``evaluate-segmentation`` stages wrote (``<run>/datasets/predictions-<stage>-<tag>/
predictions/*.png``, generated ids, 0 'other') and the split's ground truth, for every method it finds:

- **mIoU** recomputed from the raw predictions with the stage's own rule (image-level matching, PASS eq. 1, 'other'
  included), which must equal the reported figure;
- **chance level**: the same predictions scored against the ground truth of other images (a random permutation
  among images of the same size; the matching refitted on each), mean and 95th percentile over ``--permutations``;
  a method at or below it carries no information about the categories;
- **paired bootstrap** of the difference between the fine-tuned model and its labels (and each baseline): images
  resampled with replacement ``--resamples`` times, the matching refitted on each resample, the 95% interval;
- **fit** (``--fit-images``): the fine-tuned model's agreement with its own generated labels on the first training
  images of the run's labels dataset (pixel accuracy and mIoU with identity ids; the share of 'other' in each).

It reads the split's ground truth: a diagnosis, never part of the method (no stage reads what this prints).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.data import shards  # noqa: E402
from trainers.data.imagenet_s import IGNORE_LABEL, class_indices, decode_label_png, semantic_map  # noqa: E402
from trainers.evaluation.semantic import OTHER, image_level_matching  # noqa: E402

STAGES = {  # report label -> evaluate-segmentation stage name (without the split tag)
    "k-means random": "kmeans-random-k{k}",
    "k-means pretrained": "kmeans-pretrained-k{k}",
    "PASS labels": "labels-k{k}",
    "PASS fine-tuned": "finetune",
}


def miou(conf: np.ndarray, gt_conf: np.ndarray | None = None) -> float:
    """The stage's fully unsupervised mIoU of per-image confusions ``conf`` [N, P, G]: image-level matching (eq. 1)
    then per-class IoU over classes with pixels ('other' included). ``gt_conf``: the confusions whose ground-truth
    side to use for the image-level sets (the permutation test passes the permuted ones as ``conf``)."""
    pred_sets = conf[:, 1:, :].sum(2) > 0  # [N, P-1]
    gt_sets = conf[:, :, 1:].sum(1) > 0  # [N, G-1]
    counts = np.zeros((conf.shape[1], conf.shape[2]), dtype=np.int64)
    counts[1:, 1:] = pred_sets.T.astype(np.int64) @ gt_sets.astype(np.int64)
    mapping = image_level_matching(counts)
    total = conf.sum(0)
    n_gt = conf.shape[2]
    tp, pred = np.zeros(n_gt), np.zeros(n_gt)
    for p, g in enumerate(mapping):
        if g >= 0:
            tp[g] += total[p, g]
            pred[g] += total[p].sum()
    gt = total.sum(0).astype(np.float64)
    union = pred + gt - tp
    present = union > 0
    return float((tp[present] / union[present]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--tag", default="eval", help="the split's suffix in the stage names (eval or val)")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=50)
    ap.add_argument("--fit-images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    out: dict = {"split": str(a.split), "tag": a.tag, "methods": {}}

    # predictions and ground truth, once per method
    categories = shards.DatasetIndex.load(a.split).categories
    classes = class_indices(categories)
    gts, names = [], []
    for key, _, record in shards.iter_samples(a.split, decode=False, allow_parts=True):
        gts.append(semantic_map(record, classes).astype(np.int64))
        names.append(str(record.get("file_name") or f"{key}.png"))
    n_gt = len(categories) + 1
    sizes = np.array([g.shape for g in gts])
    preds: dict[str, list[np.ndarray]] = {}
    for label, stage in STAGES.items():
        d = a.run / "datasets" / f"predictions-{stage.format(k=a.k)}-{a.tag}" / "predictions"
        if d.is_dir():
            preds[label] = [decode_label_png((d / n).with_suffix(".png")).astype(np.int64) for n in names]
    if not preds:
        sys.exit(f"no predictions-*-{a.tag} folders under {a.run / 'datasets'}")

    def confusions(maps: list[np.ndarray], order: np.ndarray) -> np.ndarray:
        n_pred = a.k + 1
        out_ = np.zeros((len(maps), n_pred, n_gt), dtype=np.int64)
        for i, j in enumerate(order):
            p, g = maps[i], gts[j]
            keep = g != IGNORE_LABEL
            out_[i] = np.bincount(p[keep] * n_gt + g[keep], minlength=n_pred * n_gt).reshape(n_pred, n_gt)
        return out_

    identity = np.arange(len(gts))
    groups = {}
    for i, s in enumerate(map(tuple, sizes)):
        groups.setdefault(s, []).append(i)
    conf = {m: confusions(maps, identity) for m, maps in preds.items()}
    reported = {}
    for m in preds:
        stage = STAGES[m].format(k=a.k)
        rj = a.run / f"{stage}-{a.tag}" / "result.json"
        if rj.is_file():
            reported[m] = json.loads(rj.read_text())["metrics"]["luss/miou"]
    print(f"{a.split} ({a.tag}): {len(gts)} images, {n_gt - 1} categories + 'other'; "
          f"{a.permutations} permutations, {a.resamples} bootstrap resamples")
    for m, c in conf.items():
        chance = []
        for _ in range(a.permutations):
            order = identity.copy()
            for idx in groups.values():
                order[idx] = rng.permutation(idx)
            chance.append(miou(confusions(preds[m], order)))
        chance = np.array(chance)
        value = miou(c)
        rep = reported.get(m)
        out["methods"][m] = {"miou": value, "reported": rep, "chance_mean": float(chance.mean()),
                             "chance_p95": float(np.percentile(chance, 95))}
        print(f"  {m:20s} mIoU {100 * value:5.2f} (reported {100 * rep if rep is not None else float('nan'):5.2f})"
              f"  chance {100 * chance.mean():5.2f} (95th pct {100 * np.percentile(chance, 95):5.2f})")
    ref = "PASS fine-tuned"
    if ref in conf:
        for other in conf:
            if other == ref:
                continue
            diffs = []
            for _ in range(a.resamples):
                idx = rng.integers(0, len(gts), size=len(gts))
                diffs.append(miou(conf[ref][idx]) - miou(conf[other][idx]))
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            d = miou(conf[ref]) - miou(conf[other])
            out["methods"][other]["finetuned_minus_this"] = {"diff": d, "ci95": [float(lo), float(hi)]}
            print(f"  fine-tuned - {other:20s} {100 * d:+5.2f}  95% CI [{100 * lo:+5.2f}, {100 * hi:+5.2f}]"
                  f"{'  (not significant)' if lo <= 0 <= hi else ''}")

    if a.fit_images > 0:
        fit(a, out)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


def fit(a, out: dict) -> None:
    """The fine-tuned model's agreement with its generated labels on training images."""
    import torch

    from trainers.data.batches import images_to_tensor
    from trainers.luss.labels import proposals_to_labels
    from trainers.luss.model import read_model_file
    from trainers.luss.predict import HeadPredictor

    model = a.run / "finetune" / "model.pt"
    labels = a.run / "datasets" / f"labels-k{a.k}"
    if not model.is_file() or not (labels / "index.json").is_file():
        print(f"  fit: no {model} or labels dataset; skipped")
        return
    torch.set_grad_enabled(False)
    head = HeadPredictor(read_model_file(model), torch.device("cpu"))
    n = a.k + 1
    cm = np.zeros((n, n), dtype=np.int64)
    for i, (_, image, record) in enumerate(shards.iter_samples(labels, allow_parts=True)):
        if i >= a.fit_images:
            break
        target = proposals_to_labels(record)
        pred = head(images_to_tensor([image]))[0].numpy()[: target.shape[0], : target.shape[1]]
        cm += np.bincount(pred.ravel() * n + target.ravel(), minlength=n * n).reshape(n, n)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    r = {"images": min(i + 1, a.fit_images), "pixel_accuracy": float(tp.sum() / cm.sum()), "miou": float(iou.mean()),
         "other_share_labels": float(cm[:, OTHER].sum() / cm.sum()), "other_share_pred": float(cm[OTHER].sum() / cm.sum())}
    out["fit"] = r
    print(f"  fit on {r['images']} training images (fine-tuned vs its labels): pixel accuracy {100 * r['pixel_accuracy']:.1f}%"
          f", mIoU {100 * r['miou']:.1f}%, 'other' share labels {100 * r['other_share_labels']:.1f}% / predicted "
          f"{100 * r['other_share_pred']:.1f}%")


if __name__ == "__main__":
    main()
