"""Part mining inside object instances (PartDistillation sec. 4.2, Table 6): k-means over multi-scale pixel features.

For every instance mask: the pixel features of the chosen levels (default: the mask features at stride 4 and
the FPN level at stride 8, upsampled to the stride-4 grid), each L2-normalised, concatenated and normalised
again; the grid cells inside the mask (area-downsampled mask >= 0.5) are the points of one k-means problem
(k=4, cosine). All instances of an image batch are solved in one ``batched_kmeans`` call. Then **every pixel of
the mask at full resolution** takes its nearest centroid, its feature sampled bilinearly from each level at the
pixel's centre (the faithful variant: no blocky stride-4 boundaries). Clusters below ``min_part_area`` of the
object are dropped; the rest are the instance's class-agnostic part proposals.

Every degenerate case is counted in :class:`MiningStats`, never raised: images without instances, instances
below ``min_object_area``, masks covering fewer grid cells than k, features with fewer than k distinct values.

``cfg`` below is the stage's params model (``contract.stages.mine_parts.MinePartsParams``; ``cluster-pixels``
passes its own, which has the same instance-selection fields).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.comm import Stats
from trainers.parts.kmeans import assign_to_centroids, batched_kmeans, pack_instances
from trainers.structures import encode_masks

EPS = 1e-12


@dataclass
class MiningStats(Stats):
    """Counts of one rank's mining; ``mine/<name>`` metrics after summing over ranks."""

    prefix = "mine/"

    images: int = 0
    images_without_objects: int = 0  # no instance in the record, or no detection above the threshold
    objects: int = 0  # instances considered
    objects_too_small: int = 0  # below min_object_area: skipped
    objects_fewer_points_than_k: int = 0  # mask covers fewer grid cells than k: fewer clusters
    objects_degenerate_features: int = 0  # enough cells but fewer than k distinct features (e.g. all identical)
    objects_mined: int = 0  # instances that gave at least one proposal
    proposals: int = 0
    proposals_too_small: int = 0  # clusters below min_part_area: dropped
    seconds_forward: float = 0.0  # in the model's forward pass (incl. detection)
    seconds_mining: float = 0.0  # everything after it: features, k-means, assignment, refinement, RLE

    def derived(self) -> dict[str, float]:
        total = self.seconds_forward + self.seconds_mining
        return {"share_outside_forward": self.seconds_mining / total if total > 0 else 0.0,
                "proposals_per_object": self.proposals / self.objects_mined if self.objects_mined else 0.0}


@dataclass
class Instance:
    """One object instance to mine: its full-resolution mask on the feature device, score and record object id."""

    image: int  # index in the batch
    index: int  # index among its image's instances (seeds the subsample: independent of batching and rank)
    mask: Tensor  # [H, W] bool
    score: float
    object_id: Any = None


@dataclass
class Proposal:
    object_id: Any
    mask: np.ndarray  # [H, W] bool
    score: float
    area: int
    cohesion: float  # mean cosine similarity of the proposal's pixels to its centroid
    object_score: float = 1.0


def instance_seed(key: str, index: int, seed: int) -> int:
    """A per-instance seed from the image key: subsampling never depends on batch composition or rank."""
    h = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def normalize(x: Tensor, dim: int) -> Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp(min=EPS)


def grid_features(levels: list[Tensor], unit: bool = True) -> Tensor:
    """Multi-scale features on the grid of ``levels[0]``: each level upsampled (bilinear), L2-normalised per pixel,
    concatenated and normalised again -> [B, D, h, w] (PartDistillation Table 6 "multi-scale"). ``unit=False``
    (the L2 rows of Table 6) concatenates the raw features instead."""
    size = levels[0].shape[-2:]
    parts = [F.interpolate(l.float(), size=size, mode="bilinear", align_corners=False) if l.shape[-2:] != size
             else l.float() for l in levels]
    return _combine(parts, 1, unit)


def point_features(levels: list[Tensor], b: int, ys: Tensor, xs: Tensor, height: int, width: int,
                   unit: bool = True) -> Tensor:
    """Multi-scale features at full-resolution pixels (ys, xs) of image b, each level sampled bilinearly at the
    pixel centre (as ``F.interpolate(..., size=(H, W), mode="bilinear")`` would) -> [M, D], same recipe as
    :func:`grid_features`."""
    gx = (xs.float() + 0.5) / width * 2 - 1
    gy = (ys.float() + 0.5) / height * 2 - 1
    grid = torch.stack([gx, gy], 1).view(1, 1, -1, 2)
    parts = [F.grid_sample(l[b:b + 1].float(), grid, mode="bilinear", align_corners=False)[0, :, 0].T for l in levels]
    return _combine(parts, 1, unit)


def _combine(parts: list[Tensor], dim: int, unit: bool) -> Tensor:
    if not unit:
        return torch.cat(parts, dim)
    return normalize(torch.cat([normalize(p, dim) for p in parts], dim), dim)


def mask_cells(masks: Tensor, size: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    """Grid cells of each instance: area-downsampled mask >= 0.5, or any overlap when that leaves fewer than k.

    masks [I, H, W] bool -> (cells [I, h, w] bool, few [I] bool: even the fallback has fewer than k cells)."""
    cover = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]
    half = cover >= 0.5
    anyc = cover > 0
    short = half.flatten(1).sum(1) < k
    cells = torch.where(short[:, None, None], anyc, half)
    return cells, cells.flatten(1).sum(1) < k


@torch.no_grad()
def instance_points(levels: list[Tensor], instances: list[Instance], keys: list[str],
                    cfg) -> tuple[list[Tensor], Tensor]:
    """The k-means problem of each instance: multi-scale features [n_i, D] of its grid cells (at most ``max_points``,
    a subsample seeded by image key and instance index), and ``few`` [I]: fewer than k cells even with the fallback."""
    grid = grid_features(levels, unit=cfg.metric == "cosine")  # [B, D, h, w]
    masks = torch.stack([inst.mask for inst in instances])
    cells, few = mask_cells(masks, tuple(grid.shape[-2:]), cfg.k)
    points = []
    for i, inst in enumerate(instances):
        f = grid[inst.image][:, cells[i]].T  # [n, D]
        if f.shape[0] > cfg.max_points:  # seeded per instance: rank and batch mates never change it
            g = torch.Generator().manual_seed(instance_seed(keys[inst.image], inst.index, cfg.seed))
            f = f[torch.randperm(f.shape[0], generator=g)[:cfg.max_points].sort().values.to(f.device)]
        points.append(f)
    return points, few


@torch.no_grad()
def mine_instances(levels: list[Tensor], instances: list[Instance], keys: list[str], images: Tensor | None,
                   cfg, stats: MiningStats) -> list[list[Proposal]]:
    """Part proposals of each instance (one list per instance, same order) from the batch's feature ``levels``.

    ``images`` [B, 3, H, W] (uint8) is needed only for ``cfg.refine``. Updates ``stats`` (not the timing).
    """
    if not instances:
        return []
    height, width = instances[0].mask.shape
    points, few = instance_points(levels, instances, keys, cfg)
    x, valid = pack_instances(points)
    _, cent, info = batched_kmeans(x, valid, cfg.k, iters=cfg.iters, metric=cfg.metric, seed=cfg.seed)
    nclus = info["num_clusters"].tolist()

    unit = cfg.metric == "cosine"
    # Full-resolution features once per image, for the union of its instances' pixels (detections overlap).
    union: dict[int, tuple[Tensor, Tensor]] = {}  # image -> (row of each pixel or -1 [H, W], features [M, D])
    for b in sorted({inst.image for inst in instances}):
        covered = torch.stack([inst.mask for inst in instances if inst.image == b]).any(0)
        ys, xs = torch.nonzero(covered, as_tuple=True)
        rows = torch.full((height, width), -1, dtype=torch.long, device=covered.device)
        rows[ys, xs] = torch.arange(ys.numel(), device=covered.device)
        union[b] = (rows, point_features(levels, b, ys, xs, height, width, unit=unit))

    out: list[list[Proposal]] = []
    for i, inst in enumerate(instances):
        if bool(few[i]):
            stats.objects_fewer_points_than_k += 1
        elif nclus[i] < cfg.k:
            stats.objects_degenerate_features += 1
        rows, feats_all = union[inst.image]
        ys, xs = torch.nonzero(inst.mask, as_tuple=True)
        feats = feats_all[rows[ys, xs]]
        c = cent[i, :max(1, nclus[i])]
        kc = c.shape[0]
        labels = assign_to_centroids(feats, c, metric=cfg.metric)
        if cfg.refine and kc > 1:
            from trainers.parts.refine import refine_labels

            labels = refine_labels(images[inst.image], ys, xs, labels, kc, iters=cfg.refine_iters)
        unit_feats = feats if unit else normalize(feats, 1)
        sim = (unit_feats * normalize(c, 1)[labels]).sum(1)
        area_obj = int(ys.numel())
        counts = torch.bincount(labels, minlength=kc)
        cohesion = torch.zeros(kc, device=sim.device).index_add_(0, labels, sim) / counts.clamp(min=1)
        keep = (counts > 0) & (counts >= cfg.min_part_area * area_obj)
        stats.proposals_too_small += int(((counts > 0) & ~keep).sum())
        masks = torch.zeros((kc, height, width), dtype=torch.bool, device=labels.device)
        masks[labels, ys, xs] = True
        masks = masks[keep].cpu().numpy()
        props = [Proposal(object_id=inst.object_id, mask=m, score=0.0, area=int(n), cohesion=float(h),
                          object_score=inst.score)
                 for m, n, h in zip(masks, counts[keep].tolist(), cohesion[keep].tolist())]
        for p in props:
            p.score = proposal_score(p, area_obj)
        stats.proposals += len(props)
        stats.objects_mined += bool(props)
        out.append(props)
    return out


def proposal_score(p: Proposal, object_area: int) -> float:
    """Ranking score of a mined part: the instance's score times the cluster's cohesion (mean cosine similarity of
    its pixels to the centroid, clipped to [0, 1]): confident objects first, and within them homogeneous parts
    before the mixed leftovers k-means makes when an instance has fewer than k real parts."""
    return float(p.object_score * max(0.0, min(1.0, p.cohesion)))


def proposals_to_records(props: list[Proposal]) -> list[dict]:
    """``proposals`` entries of a record (``trainers.structures``): class-agnostic, label 0."""
    if not props:
        return []
    rles = encode_masks(np.stack([p.mask for p in props]))
    return [{"object_id": p.object_id, "segmentation": r, "score": round(p.score, 6), "area": int(p.area), "label": 0,
             "object_score": round(float(p.object_score), 6)} for p, r in zip(props, rles)]


def gt_instances(records: list[dict], device: torch.device) -> list[Instance]:
    """The records' object masks as instances (score 1): the setting of the paper's ablations (sec. 5.5)."""
    from trainers.structures import decode_mask

    out = []
    for b, rec in enumerate(records):
        for i, obj in enumerate(rec.get("objects", [])):
            mask = torch.from_numpy(decode_mask(obj["segmentation"])).to(device)
            out.append(Instance(image=b, index=i, mask=mask, score=1.0, object_id=obj.get("id")))
    return out


def detected_instances(model, images: Tensor, records: list[dict], cfg) -> list[Instance]:
    """The teacher's detections with score > ``score_threshold`` (sec. 4.2); each carries the id of the record
    object it overlaps with IoU >= 0.5, if any (None otherwise)."""
    from trainers.structures import decode_mask

    preds = model.predict(images, top_k=cfg.max_detections)
    out = []
    for b, (pred, rec) in enumerate(zip(preds, records)):
        keep = (pred.scores > cfg.score_threshold) & pred.masks.flatten(1).any(1)
        masks, scores = pred.masks[keep], pred.scores[keep].tolist()
        ids = [None] * len(scores)
        objs = rec.get("objects", [])
        if objs and len(scores):
            gt = torch.stack([torch.from_numpy(decode_mask(o["segmentation"])) for o in objs]).to(masks.device)
            a, g = masks.flatten(1).float(), gt.flatten(1).float()
            inter = a @ g.T
            iou = inter / (a.sum(1, keepdim=True) + g.sum(1)[None] - inter).clamp(min=1)
            best, j = iou.max(1)
            ids = [objs[int(jj)].get("id") if float(bb) >= 0.5 else None for bb, jj in zip(best, j)]
        out.extend(Instance(image=b, index=i, mask=m, score=float(s), object_id=oid)
                   for i, (m, s, oid) in enumerate(zip(masks, scores, ids)))
    return out


@torch.no_grad()
def mine_batch(model, keys: list[str], images: Tensor, records: list[dict], cfg,
               stats: MiningStats) -> list[list[dict]]:
    """Mine one batch of same-size images (uint8 [B, 3, H, W] on the model's device): the ``proposals`` of each
    record. Instances below ``min_object_area`` are skipped; ``stats`` counts everything, timing included."""
    import time

    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    levels = model.pixel_features(images)
    levels = [levels[i] for i in cfg.feature_levels]
    if cfg.objects == "detected":
        instances = detected_instances(model, images, records, cfg)
    sync()
    t1 = time.perf_counter()
    if cfg.objects == "gt":
        instances = gt_instances(records, images.device)
    height, width = images.shape[-2:]
    stats.images += len(keys)
    kept = []
    for inst in instances:
        stats.objects += 1
        if int(inst.mask.sum()) < max(1.0, cfg.min_object_area * height * width):
            stats.objects_too_small += 1
        else:
            kept.append(inst)
    stats.images_without_objects += sum(1 for b in range(len(keys)) if not any(i.image == b for i in instances))
    per_instance = mine_instances(levels, kept, keys, images, cfg, stats)
    out: list[list[dict]] = [[] for _ in keys]
    for inst, props in zip(kept, per_instance):
        out[inst.image].extend(proposals_to_records(props))
    sync()
    stats.seconds_forward += t1 - t0
    stats.seconds_mining += time.perf_counter() - t1
    return out
