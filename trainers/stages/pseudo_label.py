"""Stage ``pseudo-label``: the next round's part proposals from the current part model (PartDistillation sec. 4.2).

The part decoder ``inputs.models.parts`` (the ``teacher`` alias of the part-proposal model) predicts
part masks on ``inputs.datasets.images``; the instances are the instance teacher's detections
(``inputs.models.instance_teacher``, score > ``object_score_threshold``) or, with ``objects: gt``, the
records' own object masks. "We filter out part proposals that do not overlap with the object
instance mask or have low score": a prediction is kept when

1. its score > ``score_threshold``;
2. it lies at least ``min_overlap`` inside the instance it overlaps most (eq. 1: argmax IoU);
3. clipped to that instance, it covers at least ``min_part_area`` of it (sec. 4.3's 5%);
4. it is not a duplicate (IoU > ``duplicate_iou``) of a higher-scored kept part of the same instance.

A map over shards by rank: rank r writes its share as a complete dataset part ``<out>/rank-<r>``
(``shards.part_dir``), rank 0 publishes one index over all parts (``shards.merge_parts``). Records are
the input record with ``proposals`` replaced. A rerun skips the parts already written for the same
inputs and params (the fingerprint in each part's ``source``).

Params: ``score_threshold`` 0.5, ``objects`` "detected" | "gt" (default "detected", as mine-parts: the
paper's instances; "gt" uses PartWorld's object labels), ``object_score_threshold`` 0.5,
``min_overlap`` 0.5, ``min_part_area`` 0.05, ``duplicate_iou`` 0.7, ``max_detections`` 20,
``batch_size`` 16, ``shard_size`` 1000.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import Dist, init_distributed, on_gpu
from trainers.stages import StageResult
from trainers.stages.common import (
    StageInputError,
    dataset_input,
    images_to_tensor,
    iter_batches,
    load_model_input,
    log_metrics,
    model_input_path,
)
from trainers.structures import decode_mask, encode_masks

log = logging.getLogger(__name__)


@dataclass
class PseudoLabelConfig:
    """The stage's params (PartDistillation sec. 4.2 "Self-training" filters)."""

    score_threshold: float = 0.5  # part predictions kept with score > this
    objects: str = "detected"  # instances: "detected" (instance teacher) or "gt" (the records' objects)
    object_score_threshold: float = 0.5  # detections kept with score > this (objects="detected")
    max_detections: int = 20  # instance-teacher predictions considered per image
    min_overlap: float = 0.5  # least fraction of a part inside its instance (eq. 1 assignment)
    min_part_area: float = 0.05  # least clipped part area, as a fraction of its instance's area
    duplicate_iou: float = 0.7  # a part this similar to a better kept part of the same instance is dropped
    batch_size: int = 16  # images per inference batch
    shard_size: int = 1000  # samples per output shard

    @classmethod
    def from_params(cls, params: dict) -> "PseudoLabelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in params.items() if k in names})
        if cfg.objects not in ("detected", "gt"):
            raise ValueError(f"params.objects must be 'detected' or 'gt', got {cfg.objects!r}")
        return cfg


@dataclass
class PseudoLabelStats:
    """What was kept and why the rest was dropped; summed over ranks."""

    images: int = 0
    images_without_objects: int = 0  # no record object (gt) or no detection above the threshold
    images_without_proposals: int = 0  # no part survived the filters
    objects: int = 0  # instances the parts were assigned to
    predicted: int = 0  # part predictions considered (top-k per image)
    dropped_low_score: int = 0
    dropped_outside_objects: int = 0  # no instance, or less than min_overlap inside the best one
    dropped_small: int = 0  # clipped area below min_part_area of the instance
    dropped_duplicate: int = 0
    kept: int = 0

    def add(self, other: "PseudoLabelStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def metrics(self) -> dict[str, float]:
        out = {f"pseudo_label/{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["pseudo_label/proposals_per_image"] = self.kept / self.images if self.images else 0.0
        out["pseudo_label/proposals_per_object"] = self.kept / self.objects if self.objects else 0.0
        return out


# -- instances --------------------------------------------------------------------------------


def _iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, intersection) matrices of bool masks a [N, H, W] and b [M, H, W]."""
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1, keepdim=True) + fb.sum(1)[None] - inter
    return inter / union.clamp(min=1), inter


def gt_objects(record: dict, device: torch.device) -> tuple[torch.Tensor, list]:
    """The record's object masks [J, H, W] and their ids."""
    objs = record.get("objects", [])
    h, w = int(record["height"]), int(record["width"])
    if not objs:
        return torch.zeros(0, h, w, dtype=torch.bool, device=device), []
    masks = torch.from_numpy(np.stack([decode_mask(o["segmentation"]) for o in objs])).to(device)
    return masks, [o.get("id") for o in objs]


def detected_objects(pred, record: dict, cfg: PseudoLabelConfig) -> tuple[torch.Tensor, list]:
    """Detections with score > object_score_threshold and a non-empty mask; each carries the id of the
    record object it matches with IoU >= 0.5, else None (as mine-parts)."""
    keep = (pred.scores > cfg.object_score_threshold) & pred.masks.flatten(1).any(1)
    masks = pred.masks[keep]
    ids: list = [None] * int(masks.shape[0])
    gt, gt_ids = gt_objects(record, masks.device)
    if len(ids) and len(gt_ids):
        iou, _ = _iou(masks, gt)
        best, j = iou.max(1)
        ids = [gt_ids[int(jj)] if float(bb) >= 0.5 else None for bb, jj in zip(best, j)]
    return masks, ids


# -- the filters ------------------------------------------------------------------------------


def filter_parts(part_masks: torch.Tensor, part_scores: torch.Tensor, object_masks: torch.Tensor, object_ids: list,
                 cfg: PseudoLabelConfig, stats: PseudoLabelStats) -> list[dict]:
    """PartDistillation sec. 4.2 filters on one image's part predictions, best score first.

    Returns proposals ``{"object_id", "segmentation", "score", "area", "label": 0}``, each clipped to its instance.
    """
    order = part_scores.argsort(descending=True, stable=True)
    part_masks, part_scores = part_masks[order], part_scores[order]
    stats.predicted += int(part_scores.numel())
    high = part_scores > cfg.score_threshold
    stats.dropped_low_score += int((~high).sum())
    masks, scores = part_masks[high], part_scores[high]
    if masks.shape[0] == 0:
        return []
    if object_masks.shape[0] == 0:
        stats.dropped_outside_objects += int(masks.shape[0])
        return []
    iou, inter = _iou(masks, object_masks)
    best_iou, assign = iou.max(1)  # eq. 1: the instance of highest overlap
    part_area = masks.flatten(1).sum(1).float()
    inside = inter.gather(1, assign[:, None])[:, 0] / part_area.clamp(min=1)
    object_area = object_masks.flatten(1).sum(1).float()
    kept_masks: list[torch.Tensor] = []
    kept: list[tuple[int, float, int]] = []  # (object index, score, area)
    for i in range(masks.shape[0]):
        j = int(assign[i])
        if float(best_iou[i]) <= 0 or float(inside[i]) < cfg.min_overlap:
            stats.dropped_outside_objects += 1
            continue
        clipped = masks[i] & object_masks[j]
        area = int(clipped.sum())
        if area < cfg.min_part_area * float(object_area[j]) or area == 0:
            stats.dropped_small += 1
            continue
        same = [m for m, (o, _, _) in zip(kept_masks, kept) if o == j]
        if same and float(_iou(clipped[None], torch.stack(same))[0].max()) > cfg.duplicate_iou:
            stats.dropped_duplicate += 1
            continue
        kept_masks.append(clipped)
        kept.append((j, float(scores[i]), area))
    stats.kept += len(kept)
    if not kept:
        return []
    rles = encode_masks(torch.stack(kept_masks).cpu().numpy())
    return [{"object_id": object_ids[j], "segmentation": rle, "score": round(score, 6), "area": area, "label": 0}
            for (j, score, area), rle in zip(kept, rles)]


# -- the stage --------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def fingerprint(spec: StageSpec, cfg: PseudoLabelConfig, model_paths: dict[str, Path], d: Dist) -> str:
    """What a rank's output part depends on: input shards, model files, params, (rank, world size)."""
    index = shards.DatasetIndex.load(spec.inputs.datasets["images"].path)
    doc = {"images": [s["sha256"] for s in index.shards], "models": {k: _file_sha256(p) for k, p in model_paths.items()},
           "params": dataclasses.asdict(cfg), "rank": d.rank, "world_size": d.world_size}
    return "pseudo-label:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def label_share(spec: StageSpec, cfg: PseudoLabelConfig, d: Dist, parts, instance_teacher,
                stats: PseudoLabelStats):
    """This rank's samples (key, image bytes, record with new ``proposals``), counting into ``stats``."""
    from tqdm.auto import tqdm

    path = spec.inputs.datasets["images"].path
    total = shards.num_samples_for(path, rank=d.rank, world_size=d.world_size)
    bar = tqdm(total=total, desc=spec.name, unit="img",
               disable=not d.is_main or os.environ.get("SELFTRAIN_PROGRESS", "1") == "0")
    for keys, blobs, records in iter_batches(path, cfg.batch_size, rank=d.rank, world_size=d.world_size, decode=False):
        images = images_to_tensor([shards.decode_image(b, key=k) for k, b in zip(keys, blobs)]).to(d.device)
        with torch.no_grad():
            part_preds = parts.predict(images)
            object_preds = instance_teacher.predict(images, top_k=cfg.max_detections) if cfg.objects == "detected" else None
        for b, (key, blob, record) in enumerate(zip(keys, blobs, records)):
            if object_preds is None:
                masks, ids = gt_objects(record, d.device)
            else:
                masks, ids = detected_objects(object_preds[b], record, cfg)
            stats.images += 1
            stats.objects += len(ids)
            stats.images_without_objects += not ids
            p = part_preds[b]
            proposals = filter_parts(p.masks, p.scores, masks, ids, cfg, stats)
            stats.images_without_proposals += not proposals
            yield key, blob, {**record, "proposals": proposals}
        bar.update(len(keys))
    bar.close()


def run(spec: StageSpec) -> StageResult | None:
    """Pseudo-label this rank's share into ``<out>/rank-<r>``; rank 0 publishes the merged dataset and returns counts."""
    cfg = PseudoLabelConfig.from_params(spec.params)
    out = spec.outputs.dataset
    if not out:
        raise StageInputError("stage 'pseudo-label' needs outputs.dataset (where the pseudo-labels go)")
    images_path = dataset_input(spec, "images")
    d = init_distributed(on_gpu(spec))
    names = ["parts"] + (["instance_teacher"] if cfg.objects == "detected" else [])
    model_paths = {n: model_input_path(spec, n) for n in names}
    source = fingerprint(spec, cfg, model_paths, d)
    part = shards.part_dir(out, d.rank)
    stats_file = part / "pseudo_label_stats.json"
    stats = PseudoLabelStats()
    try:
        done = shards.DatasetIndex.load(part).source == source and stats_file.is_file()
    except shards.DataError:
        done = False
    if done:
        stats = PseudoLabelStats(**json.loads(stats_file.read_text()))
        log.info("rank %d: %s already holds this share (%s): skipped", d.rank, part, source)
    else:
        parts = load_model_input(spec, "parts", d.device)
        teacher = load_model_input(spec, "instance_teacher", d.device) if cfg.objects == "detected" else None
        index = shards.DatasetIndex.load(images_path)
        stats_file.unlink(missing_ok=True)
        shards.write_dataset(label_share(spec, cfg, d, parts, teacher, stats), part, name=f"{index.name}-pseudo-labels",
                             split=index.split, categories=index.categories, shard_size=cfg.shard_size, source=source)
        write_atomic(stats_file, json.dumps(dataclasses.asdict(stats)))

    if dist.is_initialized() and d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, dataclasses.asdict(stats))
        stats = PseudoLabelStats()
        for g in gathered:
            stats.add(PseudoLabelStats(**g))
    if d.is_main:
        shards.merge_parts(out, d.world_size)
        metrics = stats.metrics()
        log_metrics(spec, metrics)
        log.info("pseudo-label: %d images, %d instances, %d proposals kept of %d (low score %d, outside objects %d, "
                 "small %d, duplicate %d); %d images without objects, %d without proposals", stats.images,
                 stats.objects, stats.kept, stats.predicted, stats.dropped_low_score, stats.dropped_outside_objects,
                 stats.dropped_small, stats.dropped_duplicate, stats.images_without_objects,
                 stats.images_without_proposals)
    if dist.is_initialized():
        dist.barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(out))
