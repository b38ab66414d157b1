"""Class-agnostic part proposal recall, AR@k (PartDistillation sec. 5.1 "Average Recall", Tables 3-6).

Two figures of the same quantity:

- ``PartProposalRecall``: the reference protocol (PartDistillation's ``ProposalEvaluator``, itself
  detectron2's ``_evaluate_box_proposals`` on masks): greedy max-overlap matching of the top-k
  proposals to the ground-truth parts, recall at IoU thresholds 0.50:0.05:0.95, averaged. Streams:
  per image it keeps only hit counts, never masks.
- ``coco_proposal_ar``: pycocotools ``COCOeval`` (segm, ``useCats=0``), whose matching is greedy in
  score order instead; a cross-check whose numbers differ slightly but follow the same trend.

Metrics are fractions in [0, 1] (the paper prints percentages).
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from trainers.structures import RLE, mask_area, mask_iou

DEFAULT_MAX_DETS = (1, 10, 50, 100, 200)
DEFAULT_IOU_THRESHOLDS = np.arange(0.5, 0.951, 0.05)


def _thresholds(values: Iterable[float]) -> np.ndarray:
    # np.arange(0.5, 0.951, 0.05) ends in 0.9500000000000002: round so an IoU of exactly 0.95 counts.
    return np.round(np.asarray(list(values), dtype=np.float64), 10)


def objects_union(record: dict) -> RLE | None:
    """Union of a record's ground-truth object masks as one RLE (None when it has no objects)."""
    rles = [o["segmentation"] for o in record.get("objects", [])]
    if not rles:
        return None
    return mask_utils.merge(rles, intersect=False)


def clip_to_gt_objects(segmentations: Sequence[RLE], record: dict) -> list[RLE]:
    """Intersect each predicted mask with the union of the record's GT object masks ("GT Object" columns of Table 3)."""
    union = objects_union(record)
    if union is None:
        h, w = int(record["height"]), int(record["width"])
        empty = mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        return [empty for _ in segmentations]
    return [mask_utils.merge([s, union], intersect=True) for s in segmentations]


def greedy_covered_overlaps(ious: np.ndarray) -> np.ndarray:
    """Per-gt covered IoU by greedy max-overlap matching (detectron2 ``_evaluate_box_proposals``).

    ``ious`` is #pred x #gt. For min(#pred, #gt) rounds: take each gt's best remaining prediction, record
    the gt whose best is largest, and remove that gt and that prediction. Gts never picked keep 0.
    """
    num_pred, num_gt = ious.shape
    covered = np.zeros(num_gt, dtype=np.float64)
    overlaps = np.array(ious, dtype=np.float64, copy=True)
    for _ in range(min(num_pred, num_gt)):
        best_pred = overlaps.argmax(axis=0)                  # for each gt, its max-overlap prediction
        best_iou = overlaps[best_pred, np.arange(num_gt)]
        gt = int(best_iou.argmax())                          # the best-covered gt
        covered[gt] = best_iou[gt]
        overlaps[best_pred[gt], :] = -1.0
        overlaps[:, gt] = -1.0
    return covered


def sort_by_score(predictions: Sequence[dict]) -> list[dict]:
    """Predictions in descending score order (stable: ties keep their input order)."""
    scores = np.asarray([float(p.get("score", 1.0)) for p in predictions], dtype=np.float64)
    return [predictions[i] for i in np.argsort(-scores, kind="stable")]


class PartProposalRecall:
    """AR@k of class-agnostic part proposals against an evaluation record's ``parts`` (reference protocol).

    ``process(record_gt, predictions)``: ``record_gt`` is an evaluation sample record (see
    ``trainers.structures``); ``predictions`` a list of ``{"segmentation": RLE, "score": float}``.
    Images without gt parts contribute nothing; an image without predictions counts its parts as missed
    (the reference skips such images, which would reward a model for staying silent on hard images).
    With ``clip_to_objects`` every prediction is first intersected with the union of the GT object masks.

    ``evaluate()`` keys: ``AR@k`` (mean recall over ``iou_thresholds``), ``R50@k`` (recall at IoU 0.5) for
    each k in ``max_dets``, and ``num_parts`` (gt parts counted).
    """

    def __init__(self, max_dets: Sequence[int] = DEFAULT_MAX_DETS,
                 iou_thresholds: Iterable[float] = DEFAULT_IOU_THRESHOLDS, clip_to_objects: bool = False):
        self.max_dets = tuple(int(k) for k in max_dets)
        if not self.max_dets or min(self.max_dets) < 1:
            raise ValueError(f"max_dets must be positive integers, got {max_dets}")
        self.iou_thresholds = _thresholds(iou_thresholds)
        self.clip_to_objects = clip_to_objects
        self.reset()

    def reset(self) -> None:
        # hits[i, j]: gt parts whose covered IoU with the top max_dets[i] proposals is >= threshold j.
        # The last column is IoU 0.5 (R50), whatever the thresholds are.
        self.hits = np.zeros((len(self.max_dets), len(self.iou_thresholds) + 1), dtype=np.int64)
        self.num_parts = 0

    def process(self, record_gt: dict, predictions: Sequence[dict]) -> None:
        gt = [p["segmentation"] for p in record_gt.get("parts", [])]
        if not gt:
            return
        self.num_parts += len(gt)
        ranked = sort_by_score(predictions)[:max(self.max_dets)]
        if not ranked:
            return
        segs = [p["segmentation"] for p in ranked]
        if self.clip_to_objects:
            segs = clip_to_gt_objects(segs, record_gt)
        ious = mask_iou(segs, gt)  # computed once for the largest k; each k takes its first rows
        thresholds = np.append(self.iou_thresholds, 0.5)
        for i, k in enumerate(self.max_dets):
            covered = greedy_covered_overlaps(ious[:k])
            self.hits[i] += (covered[None, :] >= thresholds[:, None]).sum(axis=1)

    def merge(self, other: "PartProposalRecall") -> None:
        """Add another evaluator's counts (e.g. one per rank) into this one."""
        if other.max_dets != self.max_dets or not np.array_equal(other.iou_thresholds, self.iou_thresholds):
            raise ValueError("cannot merge PartProposalRecall evaluators with different max_dets/thresholds")
        self.hits += other.hits
        self.num_parts += other.num_parts

    def recalls(self) -> np.ndarray:
        """len(max_dets) x len(iou_thresholds) recall table."""
        return self.hits[:, :-1] / max(self.num_parts, 1)

    def evaluate(self) -> dict[str, float]:
        denom = max(self.num_parts, 1)
        out: dict[str, float] = {}
        for i, k in enumerate(self.max_dets):
            out[f"AR@{k}"] = float(self.hits[i, :-1].mean() / denom)
        for i, k in enumerate(self.max_dets):
            out[f"R50@{k}"] = float(self.hits[i, -1] / denom)
        out["num_parts"] = float(self.num_parts)
        return out


def coco_proposal_ar(gt_records: Sequence[dict], pred_records: Sequence[Sequence[dict]],
                     max_dets: Sequence[int] = (1, 10, 100), clip_to_objects: bool = False) -> dict[str, float]:
    """AR@k (and AP) of class-agnostic part proposals by pycocotools COCOeval (segm, useCats=0).

    ``pred_records[i]`` is the list of ``{"segmentation", "score"}`` proposals of ``gt_records[i]``. Every
    part is category 1. Keys: ``coco/AR@k`` for each k, ``coco/AP`` and ``coco/AP50`` at the largest k.
    Not streaming (COCOeval holds every mask): a cross-check for evaluation-sized splits.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gt_records) != len(pred_records):
        raise ValueError(f"{len(gt_records)} gt records but {len(pred_records)} prediction lists")
    images, annotations, results = [], [], []
    for image_id, (record, preds) in enumerate(zip(gt_records, pred_records)):
        images.append({"id": image_id, "height": int(record["height"]), "width": int(record["width"])})
        for part in record.get("parts", []):
            seg = part["segmentation"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": seg, "area": float(mask_area(seg)),
                                "bbox": [float(v) for v in mask_utils.toBbox(seg)], "iscrowd": 0})
        segs = [p["segmentation"] for p in preds]
        if clip_to_objects:
            segs = clip_to_gt_objects(segs, record)
        for p, seg in zip(preds, segs):
            results.append({"image_id": image_id, "category_id": 1, "segmentation": seg,
                            "score": float(p.get("score", 1.0))})
    keys = [f"coco/AR@{k}" for k in max_dets] + ["coco/AP", "coco/AP50"]
    if not annotations or not results:
        return {k: 0.0 for k in keys}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "part"}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0
        ev.params.maxDets = [int(k) for k in max_dets]
        ev.evaluate()
        ev.accumulate()
    # eval["recall"]: T x K x A x M, eval["precision"]: T x R x K x A x M; area index 0 is "all"; -1 = absent.
    recall, precision = ev.eval["recall"], ev.eval["precision"]

    def mean_valid(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else 0.0

    out = {f"coco/AR@{k}": mean_valid(recall[:, :, 0, m]) for m, k in enumerate(max_dets)}
    out["coco/AP"] = mean_valid(precision[:, :, :, 0, -1])
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    out["coco/AP50"] = mean_valid(precision[t50, :, :, 0, -1])
    return out



MAX_DETS = (1, 10, 50, 100, 200)  # the k of AR@k reported by default
COCO_MAX_DETS = (1, 10, 100)  # COCOeval's maxDets


def metric_key(name: str) -> str:
    """An evaluator key as an MLflow metric name: ``AR@10`` -> ``eval/AR_10``, ``coco/AR@10`` -> ``eval/coco_AR_10``."""
    return "eval/" + name.replace("@", "_").replace("/", "_")


def stored_proposals(path: str, keys: set[str]) -> dict[str, list[dict]]:
    """``proposals`` of the records of ``keys`` in a proposals dataset (images are not decoded)."""
    from trainers.data import shards

    out = {}
    for key, _, record in shards.iter_samples(path, decode=False, allow_parts=True):
        if key in keys:
            out[key] = record.get("proposals", [])
    return out


REFERENCES = ("parts", "pseudo_labels")


def reference_record(record: dict, reference: str) -> dict:
    """The record as the evaluators' ground truth: its annotated ``parts`` (``reference="parts"``), or its
    ``proposals`` standing in as parts (``"pseudo_labels"``: the label-free selection criterion, agreement with a
    teacher's pseudo-labels on held-out images; the cluster id, if any, becomes the part category). A record with
    part labels is refused in that mode: the label-free criterion never reads them."""
    if reference == "parts":
        return record
    if reference != "pseudo_labels":
        raise ValueError(f"unknown reference {reference!r}: {' or '.join(REFERENCES)}")
    if record.get("parts"):
        raise ValueError(f"sample {record.get('key', '?')!r}: has part labels; the pseudo_labels reference (label-free "
                         "selection) reads a held-out dataset without them")
    parts = [{"id": i + 1, "object_id": p.get("object_id"), "category_id": int(p.get("label") or 0),
              "segmentation": p["segmentation"]} for i, p in enumerate(record.get("proposals") or [])]
    return {**record, "parts": parts}


def write_proposal_results(out_dir, images: list[dict], proposals: list[list[dict]], max_dets, clip_to_objects: bool,
                           reference: str) -> dict[str, str]:
    """The proposals of each image (``images`` order, image ids 1..N) as COCO files in ``out_dir``: ``images.json``
    (``{"images": [{"id", "file_name": dataset key, "height", "width"}], "categories": [part], "max_dets",
    "clip_to_objects", "reference"}``) and ``proposals.json`` (COCO results: image_id, category_id 1, RLE, score)."""
    from pathlib import Path

    from contract.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"images": [{"id": i + 1, "file_name": im["key"], "height": int(im["height"]), "width": int(im["width"])}
                      for i, im in enumerate(images)],
           "categories": [{"id": 1, "name": "part"}], "max_dets": list(max_dets), "clip_to_objects": bool(clip_to_objects),
           "reference": reference}
    res = [{"image_id": i + 1, "category_id": 1, "segmentation": q["segmentation"], "score": float(q.get("score", 1.0))}
           for i, props in enumerate(proposals) for q in props]
    return {"images.json": str(write_json(out / "images.json", doc, indent=None)),
            "proposals.json": str(write_json(out / "proposals.json", res, indent=None))}


def score_proposal_results(dataset: str, out_dir) -> dict[str, float]:
    """AR@k (``eval/AR_<k>``, ``eval/R50_<k>``, ``eval/num_parts``) of a results folder against ``dataset``, matched
    by key, with the evaluator evaluate-proposals uses: what it reported, from the files alone."""
    import json
    from pathlib import Path

    from trainers.data import shards

    out = Path(out_dir)
    doc = json.loads((out / "images.json").read_text())
    index = {im["id"]: im["file_name"] for im in doc["images"]}
    by_key: dict[str, list[dict]] = {k: [] for k in index.values()}
    for n, r in enumerate(json.loads((out / "proposals.json").read_text())):
        if r.get("image_id") not in index:
            raise ValueError(f"{out / 'proposals.json'}: entry {n} has image_id {r.get('image_id')!r}, not in images.json")
        by_key[index[r["image_id"]]].append(r)
    recall = PartProposalRecall(max_dets=doc["max_dets"], clip_to_objects=doc["clip_to_objects"])
    seen = 0
    for key, _, record in shards.iter_samples(dataset, decode=False, allow_parts=True):
        if key in by_key:
            seen += 1
            recall.process(reference_record(record, doc["reference"]), by_key[key])
    if seen != len(by_key):
        raise ValueError(f"{out}: {len(by_key) - seen} of its images are not in {dataset}")
    return {metric_key(k): v for k, v in recall.evaluate().items()}
