"""The class-specific part model ("part ranker", PartDistillation sec. 4.3 "Final self training").

A Segmenter whose part decoder predicts one label per (object class c, cluster k), the label ``offset[c] + k`` of a
:class:`~trainers.parts.label_map.LabelMap`. Inference is conditioned on the object class: a part assigned to an
object (eq. 1) is scored only among the labels of that object's class,
``r(f_i^p | c) = softmax([logits of c's clusters, no-object])``; its cluster is the argmax and its score that
probability times Mask2Former's mask quality.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.data.batches import masks_tensor
from trainers.parts.assignment import object_segments, pixel_owners
from trainers.parts.label_map import LabelMap
from trainers.structures import encode_masks, masks_iou


class RankerTargets:
    """SetCriterion targets of a ranked-parts record: every proposal with label ``offset[category] + cluster`` whose
    score (rank-parts: the eq. 2 density) is at least ``min_score`` (0: every proposal)."""

    def __init__(self, label_map: LabelMap, min_score: float = 0.0):
        self.label_map, self.min_score = label_map, min_score

    def __call__(self, record: dict) -> dict[str, torch.Tensor]:
        h, w = int(record["height"]), int(record["width"])
        kept = [(lab, p) for p in record.get("proposals", [])
                if (lab := self.label_map.label(p["category_id"], p["label"])) is not None
                and (self.min_score <= 0 or float(p.get("score", 1.0)) >= self.min_score)]
        return {"labels": torch.tensor([lab for lab, _ in kept], dtype=torch.int64),
                "masks": masks_tensor([p["segmentation"] for _, p in kept], h, w)}


def initial_state(model, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` whose name and shape the model has (the part model's E and D^p but its class head)."""
    own = model.state_dict()
    return {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}


@torch.no_grad()
def class_conditioned_parts(logits: torch.Tensor, mask_logits: torch.Tensor, object_masks: torch.Tensor,
                            object_classes: list[int], label_map: LabelMap):
    """One image: ``(masks [N, H, W] bool, scores [N], clusters [N])`` of every query, each scored within the class
    of the object it overlaps most (eq. 1): softmax over that class's cluster logits and no-object, times mask
    quality; queries on no object (or on a class without clusters) get score 0 and cluster -1.

    ``logits [N, L+1]``, ``mask_logits [N, h, w]`` (one image of the decoder outputs), ``object_masks [J, H, W]``.
    """
    size = tuple(object_masks.shape[-2:])
    up = F.interpolate(mask_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    masks = up > 0
    quality = (up.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    n = logits.shape[0]
    scores = torch.zeros(n, device=logits.device)
    clusters = torch.full((n,), -1, dtype=torch.int64, device=logits.device)
    if object_masks.shape[0] == 0 or n == 0:
        return masks, scores, clusters
    iou, _ = masks_iou(masks, object_masks)
    best, assign = iou.max(1)
    for j, c in enumerate(object_classes):
        mine = torch.nonzero((assign == j) & (best > 0))[:, 0]
        kc = label_map.num_clusters.get(int(c), 0)
        if mine.numel() == 0 or kc == 0:
            continue
        off = label_map.offsets[int(c)]
        sub = torch.cat([logits[mine, off: off + kc], logits[mine, -1:]], dim=1).float().softmax(-1)[:, :kc]
        p, k = sub.max(1)
        scores[mine] = p * quality[mine]
        clusters[mine] = k
    return masks, scores, clusters


@torch.no_grad()
def predict_part_labels(model, images: torch.Tensor, object_masks: list[torch.Tensor],
                        object_classes: list[list[int]], label_map: LabelMap, soft: bool = False) -> list[np.ndarray]:
    """Part cluster ids per pixel for evaluation (PartDistillation sec. 5.1, "GT object" setting).

    ``images [B, 3, H, W]``; per image ``object_masks[b]`` bool ``[J, H, W]`` and ``object_classes[b]`` their J
    category ids. Returns per image an ``H x W`` int64 map: inside each object, the cluster id (< k_c of the
    object's class) of the part that owns the pixel (``argmax_i M_i(x) s_i`` over the parts assigned to the object,
    scored within its class), -1 elsewhere (background, objects of classes without clusters, uncovered pixels).
    Later objects paint over earlier ones. The object-class map for ``PartClusteringEvaluator.process`` is the one
    the objects paint (``paint_label_map(object RLEs, classes, H, W)``), or None for GT objects. ``soft``: ``M_i`` is
    the mask probability, so no pixel of an object with parts is left uncovered (``pixel_owners``).
    """
    outputs = model(images.to(next(model.parameters()).device))
    out = []
    for b in range(images.shape[0]):
        om = object_masks[b].to(outputs["pred_masks"].device).bool()
        masks, scores, clusters = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                          list(object_classes[b]), label_map)
        probs = None
        if soft:
            probs = F.interpolate(outputs["pred_masks"][b][None].float(), size=tuple(om.shape[-2:]), mode="bilinear",
                                  align_corners=False)[0].sigmoid()
        owners = pixel_owners(masks, scores, om, probs)
        labels = torch.full(tuple(om.shape[-2:]), -1, dtype=torch.int64, device=om.device)
        for j in range(om.shape[0]):
            sel = owners[j] >= 0
            labels[sel] = clusters[owners[j][sel]]
            labels[om[j] & ~sel] = -1
        out.append(labels.cpu().numpy())
    return out


def relabel(model, images: torch.Tensor, objects: list[tuple[torch.Tensor, list, list[int]]], label_map: LabelMap,
            score_threshold: float = 0.3, min_part_area: float = 0.05, stats=None) -> list[list[dict]]:
    """The next round's pseudo-labels (sec. 4.3: "the same postprocessing step (area and score thresholds)").

    ``objects[b] = (masks [J, H, W], object ids, category ids)``. Returns per image the proposals
    ``{"object_id", "category_id", "segmentation", "area", "label": cluster, "score", "query"}``; ``stats``
    (``RankPartsStats``), when given, counts predictions, drops and labels.
    """
    with torch.no_grad():
        outputs = model(images.to(next(model.parameters()).device))
    result = []
    for b, (om, ids, cats) in enumerate(objects):
        om = om.to(outputs["pred_masks"].device).bool()
        masks, scores, clusters = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                          list(cats), label_map)
        if stats is not None:
            stats.predicted += int(masks.shape[0])
        proposals = []
        for j, segs in enumerate(object_segments(masks, scores, om, score_threshold, min_part_area, stats)):
            if stats is not None:
                stats.objects_without_candidates += not segs
            if not segs:
                continue
            rles = encode_masks(torch.stack([s for _, s in segs]).cpu().numpy())
            proposals += [{"object_id": ids[j], "category_id": int(cats[j]), "segmentation": rle,
                           "area": int(seg.sum()), "label": int(clusters[i]), "score": round(float(scores[i]), 6),
                           "query": int(i)} for (i, seg), rle in zip(segs, rles)]
        if stats is not None:
            stats.labelled += len(proposals)
        result.append(proposals)
    return result
