"""Does PASS's fine-tuning step beat its labels when the labels carry the categories? (issue 13; BENCHMARKS.md
"PASS / LUSS").

    python benchmarks/luss_finetune_mechanism.py --representation RUN/pixel-attention/model.pt \\
        --train data/partworld-demo/train --eval data/partworld-demo/eval --noise 0.0,0.3,0.5 -o /tmp/mech

The paper's claim (sec. 4.4, "before/after fine-tuning") is that a segmentation network trained on the generated
labels beats the labels themselves. Whether it does in a run depends on two things at once: the fine-tuning step and
whether the labels carry the categories at all. This separates them. It makes labels whose quality is known, from the
ground truth (read on purpose: a diagnosis, never part of the method), degraded the way PASS's labels are:

- the category ids are permuted (generated ids are arbitrary; the evaluation's matching must find them);
- every object's id is replaced by a uniformly random one with probability ``--noise`` (a wrongly clustered image);
- the map is sampled at the representation's output stride and blown back up with nearest neighbours (labels made
  at feature resolution);

trains ``finetune-segmentation`` on them through the real stage (torchrun, DeepSpeed, the run's own params), applies
the same degradation to the evaluation images (the "labels" row, what the labelling rule gives on new images), and
scores both with the stage's fully unsupervised mIoU (image-level matching, 'other' included), with a paired
bootstrap interval of the difference (``benchmarks/luss_significance.py``'s rule).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainers"))
sys.path.insert(0, str(REPO / "tests" / "trainers" / "stages"))
sys.path.insert(0, str(REPO / "benchmarks"))

from luss_significance import miou  # noqa: E402
from trainers.data import shards  # noqa: E402
from trainers.data.imagenet_s import IGNORE_LABEL, class_indices, semantic_map  # noqa: E402
from trainers.luss.labels import LabelRule, labels_to_proposals  # noqa: E402


def degrade(gt: np.ndarray, perm: np.ndarray, noise: float, stride: int, rng: np.random.Generator,
            objects: list[np.ndarray]) -> np.ndarray:
    """Ground-truth map (0 'other', 1..C) -> generated-style labels: ids permuted, each object's id random with
    probability ``noise``, sampled at ``stride`` and blown back up (nearest)."""
    out = np.where(gt == IGNORE_LABEL, 0, perm[np.clip(gt, 0, len(perm) - 1)])
    for m in objects:
        if rng.random() < noise:
            out[m & (gt != 0)] = rng.integers(1, len(perm))
    h, w = out.shape
    ys = np.minimum((np.arange(0, h, stride) + stride // 2), h - 1)
    xs = np.minimum((np.arange(0, w, stride) + stride // 2), w - 1)
    small = out[np.ix_(ys, xs)]
    return np.repeat(np.repeat(small, stride, 0), stride, 1)[:h, :w]


def object_masks(record: dict) -> list[np.ndarray]:
    from trainers.structures import decode_mask

    return [decode_mask(o["segmentation"]) for o in record.get("objects", [])]


def write_labels(train: Path, out: Path, perm: np.ndarray, noise: float, stride: int, seed: int, limit: int | None,
                 timm_name: str):
    index = shards.DatasetIndex.load(train)
    classes = class_indices(index.categories)
    rng = np.random.default_rng(seed)

    def samples():
        for i, (key, image, record) in enumerate(shards.iter_samples(train, allow_parts=True)):
            if limit is not None and i >= limit:
                break
            labels = degrade(semantic_map(record, classes), perm, noise, stride, rng, object_masks(record))
            rec = {k: v for k, v in record.items() if k not in ("objects", "parts", "proposals", "ignore")}
            rec["proposals"] = labels_to_proposals(labels)
            yield key, image, rec

    shards.write_dataset(samples(), out, name=f"mechanism-noise{noise}", split="train", categories=index.categories,
                         shard_size=250)
    LabelRule(method="pixel_attention", k=len(perm) - 1, threshold=0.5, other_cluster=None, upsample=1,
              timm_name=timm_name, output_stride=stride, model=None,
              stats={"made_by": "benchmarks/luss_finetune_mechanism.py", "noise": noise}).save(
        out, np.zeros((len(perm) - 1, 1), dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--representation", type=Path, required=True, help="the run's representation (model.pt)")
    ap.add_argument("--train", type=Path, required=True, help="a labelled training split (its ground truth is degraded)")
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--noise", default="0.0,0.3,0.5", help="probabilities of a random id per object")
    ap.add_argument("--stride", type=int, default=4, help="the labels' grid in pixels (the demo's rule: output stride 16 "
                    "upsampled 4x)")
    ap.add_argument("--params", default='{"steps": 120, "lr": 0.001, "crop_size": 96, "crop_scale": [0.5, 1.0], '
                    '"checkpoint_every": 1000}', help="finetune-segmentation params (JSON; default: the demo's)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from runtime_helpers import run_stage
    from stage_helpers import result, stage_spec
    from trainers.data.batches import images_to_tensor
    from trainers.luss.model import read_model_file
    from trainers.luss.predict import HeadPredictor

    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    index = shards.DatasetIndex.load(a.eval)
    classes = class_indices(index.categories)
    n = len(index.categories) + 1
    perm = np.concatenate([[0], np.random.default_rng(a.seed).permutation(np.arange(1, n))])
    evals = [(image, semantic_map(record, classes).astype(np.int64), object_masks(record))
             for _, image, record in shards.iter_samples(a.eval, allow_parts=True)]
    report = {"representation": str(a.representation), "train": str(a.train), "eval": str(a.eval),
              "stride": a.stride, "params": json.loads(a.params), "rows": []}
    for noise in (float(x) for x in a.noise.split(",")):
        t0 = time.perf_counter()
        labels_dir = a.out / f"labels-noise{noise}"
        write_labels(a.train, labels_dir, perm, noise, a.stride, a.seed, a.train_images,
                     read_model_file(a.representation)["timm_name"])
        workdir = a.out / f"finetune-noise{noise}"
        run_stage(stage_spec("finetune-segmentation", workdir, datasets={"train": labels_dir},
                             models={"representation": a.representation}, params=json.loads(a.params),
                             nproc=a.nproc, micro=a.micro), nproc=a.nproc, timeout=3600)
        ft = result(workdir)
        head = HeadPredictor(read_model_file(Path(ft["model_path"])), torch.device("cpu"))
        rng = np.random.default_rng(a.seed + 1)
        conf_labels = np.zeros((len(evals), n, n), dtype=np.int64)
        conf_ft = np.zeros_like(conf_labels)
        for i, (image, gt, objs) in enumerate(evals):
            lab = degrade(gt, perm, noise, a.stride, rng, objs)
            pred = head(images_to_tensor([image]))[0].numpy()[: gt.shape[0], : gt.shape[1]]
            keep = gt != IGNORE_LABEL
            conf_labels[i] = np.bincount(lab[keep] * n + gt[keep], minlength=n * n).reshape(n, n)
            conf_ft[i] = np.bincount(pred[keep] * n + gt[keep], minlength=n * n).reshape(n, n)
        brng = np.random.default_rng(a.seed + 2)
        diffs = []
        for _ in range(a.resamples):
            idx = brng.integers(0, len(evals), size=len(evals))
            diffs.append(miou(conf_ft[idx]) - miou(conf_labels[idx]))
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        row = {"noise": noise, "labels_miou": miou(conf_labels), "finetuned_miou": miou(conf_ft),
               "diff_ci95": [float(lo), float(hi)], "train_pixel_accuracy": ft["metrics"].get("train/pixel_accuracy"),
               "seconds": time.perf_counter() - t0}
        report["rows"].append(row)
        print(f"noise {noise:.2f}: labels {100 * row['labels_miou']:5.2f}  fine-tuned {100 * row['finetuned_miou']:5.2f}"
              f"  diff 95% CI [{100 * lo:+5.2f}, {100 * hi:+5.2f}]  ({row['seconds']:.0f} s)", flush=True)
        (a.out / "mechanism.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
