"""The object instances of an image that parts are assigned to: the record's objects or a teacher's detections."""
from __future__ import annotations

import numpy as np
import torch

from trainers.structures import decode_mask, masks_iou


def gt_objects(record: dict, device: torch.device) -> tuple[torch.Tensor, list]:
    """The record's object masks [J, H, W] and their ids."""
    objs = record.get("objects", [])
    h, w = int(record["height"]), int(record["width"])
    if not objs:
        return torch.zeros(0, h, w, dtype=torch.bool, device=device), []
    masks = torch.from_numpy(np.stack([decode_mask(o["segmentation"]) for o in objs])).to(device)
    return masks, [o.get("id") for o in objs]


def kept_detections(pred, score_threshold: float) -> torch.Tensor:
    """bool [N]: detections with score > ``score_threshold`` and a non-empty mask."""
    return (pred.scores > score_threshold) & pred.masks.flatten(1).any(1)


def detected_objects(pred, record: dict, score_threshold: float) -> tuple[torch.Tensor, list]:
    """Detections with score > ``score_threshold`` and a non-empty mask; each carries the id of the record object
    it matches with IoU >= 0.5, else None (as mine-parts)."""
    masks = pred.masks[kept_detections(pred, score_threshold)]
    ids: list = [None] * int(masks.shape[0])
    gt, gt_ids = gt_objects(record, masks.device)
    if len(ids) and len(gt_ids):
        iou, _ = masks_iou(masks, gt)
        best, j = iou.max(1)
        ids = [gt_ids[int(jj)] if float(bb) >= 0.5 else None for bb, jj in zip(best, j)]
    return masks, ids


def image_objects(record: dict, pred, score_threshold: float, categories: list[dict], device,
                  nms_iou: float | None = None):
    """(masks [J, H, W], ids, category ids) of one image's objects: the record's (``pred`` None) or the detections
    of ``pred`` (class = the detector's predicted class, an index into ``categories``). ``nms_iou``: a detection
    whose mask overlaps a better-scored kept one with IoU above it is dropped, whatever the classes (duplicates)."""
    if pred is None:
        masks, ids = gt_objects(record, device)
        return masks, ids, [int(o["category_id"]) for o in record.get("objects", [])]
    keep = kept_detections(pred, score_threshold)
    masks, ids = detected_objects(pred, record, score_threshold)
    cats = [int(categories[int(label)]["id"]) for label in pred.labels[keep]]
    if nms_iou is not None and len(cats) > 1:
        from trainers.data.pseudo_labels import mask_nms

        order = mask_nms(masks, pred.scores[keep], torch.zeros(len(cats), dtype=torch.int64), nms_iou).tolist()
        order.sort()  # painting order as before: later detections paint over earlier ones
        masks, ids, cats = masks[order], [ids[i] for i in order], [cats[i] for i in order]
    return masks, ids, cats
