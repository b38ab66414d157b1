"""Parts assigned to objects and pixels to parts (PartDistillation sec. 4.3, eq. 1).

Eq. 1: a part goes to the object it overlaps most (IoU). Within an object a pixel goes to its most confident
part, ``argmax_i M_i(x) s_i`` over the parts assigned to the object (:func:`pixel_owners`); the candidates of an
object are the parts that won enough of its pixels with enough score (:func:`object_segments`). ``rank-parts``,
``rank-pseudo-label`` and the part evaluation all use these.
"""
from __future__ import annotations

import torch

from trainers.structures import masks_iou


def part_predictions(model, images: torch.Tensor):
    """Every query's prediction of the class-agnostic part model (``InstancePredictions`` per image)."""
    return model.predict(images, top_k=model.cfg.decoder.num_queries * model.cfg.decoder.num_classes)


def pixel_owners(part_masks: torch.Tensor, part_scores: torch.Tensor, object_masks: torch.Tensor,
                 soft_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Which part owns each pixel of each object (PartDistillation sec. 4.3): ``[J, H, W]`` part index or -1.

    Parts go to the object of highest IoU (eq. 1); within object j a pixel goes to ``argmax_i M_i(x) s_i`` over
    the parts assigned to j; pixels outside the object, or covered by none of its parts, are -1. ``M_i`` is the
    binary mask, or with ``soft_masks`` (``[N, H, W]`` mask probabilities) the probability: then every pixel of an
    object with at least one part is owned (Mask2Former's semantic inference, within the object).
    """
    j_count, h, w = object_masks.shape
    owners = torch.full((j_count, h, w), -1, dtype=torch.int64, device=object_masks.device)
    if part_masks.shape[0] == 0 or j_count == 0:
        return owners
    iou, _ = masks_iou(part_masks, object_masks)
    best, assign = iou.max(1)
    weighted = (part_masks.float() if soft_masks is None else soft_masks.float()) * part_scores.float().clamp(min=1e-6)[:, None, None]
    for j in range(j_count):
        mine = torch.nonzero((assign == j) & (best > 0))[:, 0]
        if mine.numel() == 0:
            continue
        val, idx = weighted[mine].max(0)
        owners[j] = torch.where(object_masks[j] & (val > 0), mine[idx], owners[j])
    return owners


def object_segments(part_masks, part_scores, object_masks, score_threshold: float, min_part_area: float,
                    stats=None) -> list[list[tuple[int, torch.Tensor]]]:
    """Per object, its candidates ``(part index, segment mask)``: parts with score > ``score_threshold`` whose
    pixels (see :func:`pixel_owners`) cover at least ``min_part_area`` of the object, largest segment first.

    ``stats`` (e.g. ``RankPartsStats``), when given, counts ``unassigned``, ``dropped_low_score`` and ``dropped_small``.
    """
    owners = pixel_owners(part_masks, part_scores, object_masks)
    if stats is not None and part_masks.shape[0] and object_masks.shape[0]:
        stats.unassigned += int((masks_iou(part_masks, object_masks)[0].max(1).values <= 0).sum())
    elif stats is not None:
        stats.unassigned += int(part_masks.shape[0])
    out = []
    for j in range(object_masks.shape[0]):
        area = float(object_masks[j].sum())
        ids, counts = torch.unique(owners[j][owners[j] >= 0], return_counts=True)
        segs = []
        for i, n in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1]):
            if float(part_scores[i]) <= score_threshold:
                if stats is not None:
                    stats.dropped_low_score += 1
                continue
            if n < min_part_area * area or n == 0:
                if stats is not None:
                    stats.dropped_small += 1
                continue
            segs.append((i, owners[j] == i))
        out.append(segs)
    return out
