"""Dataset-level k-means of pixel features per object class: the one-stage baseline's labels (PartDistillation sec. 5).

Phase 1 (:func:`spill_pixels`): a seeded sample of ``pixels_per_instance`` pixel features of every instance
(mine-parts' multi-scale features, ``trainers.parts.mining.point_features``), spilled per object class
(``FeatureSpill``). Phase 2 is ``class_clusters.cluster_classes``. Phase 3 (:func:`label_pixels`): every pixel
of every instance takes its class's nearest centroid. ``p`` below is the stage's params model
(``contract.stages.cluster_pixels.ClusterPixelsParams``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainers.comm import Stats
from trainers.data.batches import images_to_tensor, iter_same_size
from trainers.parts.class_clusters import FeatureSpill
from trainers.parts.mining import (Proposal, detected_instances, gt_instances, instance_seed, normalize,
                                   point_features, proposal_score, proposals_to_records)


@dataclass
class PixelClusterStats(Stats):
    """Counts of one rank; ``cluster/<name>`` metrics after summing over ranks."""

    prefix = "cluster/"

    images: int = 0
    images_without_objects: int = 0
    objects: int = 0
    objects_too_small: int = 0
    objects_unclustered: int = 0
    pixels_spilled: int = 0
    pixels_nonfinite: int = 0
    proposals: int = 0
    proposals_too_small: int = 0


class _Predicted:
    """A model stand-in that hands ``detected_instances`` predictions already made (one forward, not two)."""

    def __init__(self, preds):
        self.preds = preds

    def predict(self, images, top_k=None):
        return self.preds


def _not_duplicates(masks: torch.Tensor, scores: torch.Tensor, nms_iou: float | None) -> list[bool]:
    """Per kept detection, False when a better-scored one overlaps its mask with IoU > ``nms_iou`` whatever the
    classes (the same rule as evaluate-parts' object_nms_iou); all True without ``nms_iou``."""
    n = int(scores.numel())
    if nms_iou is None or n < 2:
        return [True] * n
    from trainers.data.pseudo_labels import mask_nms

    kept = set(mask_nms(masks, scores, torch.zeros(n, dtype=torch.int64), nms_iou).tolist())
    return [i in kept for i in range(n)]


class BatchInstances:
    """One forward pass over a batch of same-size images: its feature levels and its kept instances (with class)."""

    def __init__(self, model, keys, images, records, p, class_of_label: dict[int, int],
                 stats: PixelClusterStats, count: bool):
        levels = model.pixel_features(images)
        self.levels = [levels[i] for i in p.feature_levels]
        self.height, self.width = images.shape[-2:]
        if p.objects == "gt":
            insts = gt_instances(records, images.device)
            classes = [int(o["category_id"]) for r in records for o in r.get("objects", [])]
        else:
            preds = model.predict(images, top_k=p.max_detections)
            insts = detected_instances(_Predicted(preds), images, records, p)  # mine-parts' selection, same order
            classes, unique = [], []
            for pred in preds:
                keep = (pred.scores > p.score_threshold) & pred.masks.flatten(1).any(1)
                classes += [class_of_label[int(lab)] for lab in pred.labels[keep].tolist()]
                unique += _not_duplicates(pred.masks[keep], pred.scores[keep], p.object_nms_iou)
            insts, classes = [i for i, u in zip(insts, unique) if u], [c for c, u in zip(classes, unique) if u]
        min_area = max(1.0, p.min_object_area * self.height * self.width)
        self.instances = [(i, c) for i, c in zip(insts, classes) if int(i.mask.sum()) >= min_area]
        if count:
            stats.images += len(keys)
            stats.objects += len(insts)
            stats.objects_too_small += len(insts) - len(self.instances)
            stats.images_without_objects += sum(1 for b in range(len(keys)) if not any(i.image == b for i in insts))

    def features(self, inst, ys, xs) -> torch.Tensor:
        return point_features(self.levels, inst.image, ys, xs, self.height, self.width)


@torch.no_grad()
def spill_pixels(model, path: str, spill: FeatureSpill, p, class_of_label: dict[int, int],
                 *, rank: int, world_size: int, device, stats: PixelClusterStats, on_batch=lambda n: None) -> None:
    """Phase 1: a seeded sample of ``pixels_per_instance`` pixel features of every instance, spilled by class."""
    for group in iter_same_size(path, p.batch_size, rank=rank, world_size=world_size, allow_parts=p.allow_parts):
        keys, records = [g[0] for g in group], [g[3] for g in group]
        images = images_to_tensor([g[2] for g in group]).to(device)
        batch = BatchInstances(model, keys, images, records, p, class_of_label, stats, count=True)
        for n, (inst, cls) in enumerate(batch.instances):
            ys, xs = torch.nonzero(inst.mask, as_tuple=True)
            if ys.numel() > p.pixels_per_instance:
                g = torch.Generator().manual_seed(instance_seed(keys[inst.image], inst.index, p.seed))
                pick = torch.randperm(ys.numel(), generator=g)[:p.pixels_per_instance].to(ys.device)
                ys, xs = ys[pick], xs[pick]
            spill.append(cls, batch.features(inst, ys, xs).cpu().numpy())
            stats.pixels_spilled += int(ys.numel())
        on_batch(len(group))


@torch.no_grad()
def label_pixels(model, keys: list[str], images: torch.Tensor, records: list[dict], centroids: dict[int, torch.Tensor],
                 p, class_of_label: dict[int, int], stats: PixelClusterStats) -> list[list[dict]]:
    """Phase 3 on a batch of same-size images: per image its proposals, every instance pixel labelled by its class's
    nearest centroid (max cosine similarity); one proposal per cluster id present in the instance."""
    batch = BatchInstances(model, keys, images, records, p, class_of_label, stats, count=False)
    props: list[list[dict]] = [[] for _ in keys]
    for inst, cls in batch.instances:
        cent = centroids.get(cls)
        if cent is None or not len(cent):
            stats.objects_unclustered += 1
            continue
        ys, xs = torch.nonzero(inst.mask, as_tuple=True)
        feats = batch.features(inst, ys, xs)
        finite = torch.isfinite(feats).all(1)
        stats.pixels_nonfinite += int((~finite).sum())
        feats = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        sim = normalize(feats, 1) @ cent.to(feats.device).T  # zero / NaN rows: all 0 -> cluster 0, the largest
        labels = sim.argmax(1)
        best = sim.gather(1, labels[:, None])[:, 0]
        area_obj = int(ys.numel())
        found, ids = [], []
        for j, n in enumerate(torch.bincount(labels, minlength=len(cent)).tolist()):
            if n == 0:
                continue
            if n < p.min_part_area * area_obj:
                stats.proposals_too_small += 1
                continue
            sel = labels == j
            m = np.zeros((batch.height, batch.width), dtype=bool)
            m[ys[sel].cpu().numpy(), xs[sel].cpu().numpy()] = True
            prop = Proposal(object_id=inst.object_id, mask=m, score=0.0, area=n, cohesion=float(best[sel].mean()),
                            object_score=inst.score)
            prop.score = proposal_score(prop, area_obj)
            found.append(prop)
            ids.append(j)
        for rec, j in zip(proposals_to_records(found), ids):
            props[inst.image].append({**rec, "label": j, "category_id": cls})
        stats.proposals += len(found)
    return props
