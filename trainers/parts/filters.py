"""The self-training filters of part pseudo-labels (PartDistillation sec. 4.2 "Self-training").

"We filter out part proposals that do not overlap with the object instance mask or have low score": a part
prediction is kept when (1) its score > ``score_threshold``; (2) it lies at least ``min_overlap`` inside the
instance it overlaps most (eq. 1: argmax IoU); (3) clipped to that instance, it covers at least
``min_part_area`` of it (sec. 4.3's 5%); (4) it is not a duplicate (IoU > ``duplicate_iou``) of a
higher-scored kept part of the same instance. Every drop is counted in :class:`PseudoLabelStats`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.comm import Stats
from trainers.structures import encode_masks, masks_iou


@dataclass
class PseudoLabelStats(Stats):
    """What was kept and why the rest was dropped; summed over ranks."""

    prefix = "pseudo_label/"

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

    def derived(self) -> dict[str, float]:
        return {"proposals_per_image": self.kept / self.images if self.images else 0.0,
                "proposals_per_object": self.kept / self.objects if self.objects else 0.0}


def filter_parts(part_masks: torch.Tensor, part_scores: torch.Tensor, object_masks: torch.Tensor, object_ids: list,
                 p, stats: PseudoLabelStats) -> list[dict]:
    """The sec. 4.2 filters on one image's part predictions, best score first; ``p`` holds ``score_threshold``,
    ``min_overlap``, ``min_part_area`` and ``duplicate_iou`` (``PseudoLabelParams``).

    Returns proposals ``{"object_id", "segmentation", "score", "area", "label": 0}``, each clipped to its instance.
    """
    order = part_scores.argsort(descending=True, stable=True)
    part_masks, part_scores = part_masks[order], part_scores[order]
    stats.predicted += int(part_scores.numel())
    high = part_scores > p.score_threshold
    stats.dropped_low_score += int((~high).sum())
    masks, scores = part_masks[high], part_scores[high]
    if masks.shape[0] == 0:
        return []
    if object_masks.shape[0] == 0:
        stats.dropped_outside_objects += int(masks.shape[0])
        return []
    iou, inter = masks_iou(masks, object_masks)
    best_iou, assign = iou.max(1)  # eq. 1: the instance of highest overlap
    part_area = masks.flatten(1).sum(1).float()
    inside = inter.gather(1, assign[:, None])[:, 0] / part_area.clamp(min=1)
    object_area = object_masks.flatten(1).sum(1).float()
    kept_masks: list[torch.Tensor] = []
    kept: list[tuple[int, float, int]] = []  # (object index, score, area)
    for i in range(masks.shape[0]):
        j = int(assign[i])
        if float(best_iou[i]) <= 0 or float(inside[i]) < p.min_overlap:
            stats.dropped_outside_objects += 1
            continue
        clipped = masks[i] & object_masks[j]
        area = int(clipped.sum())
        if area < p.min_part_area * float(object_area[j]) or area == 0:
            stats.dropped_small += 1
            continue
        same = [m for m, (o, _, _) in zip(kept_masks, kept) if o == j]
        if same and float(masks_iou(clipped[None], torch.stack(same))[0].max()) > p.duplicate_iou:
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
