"""Part predictions for the part evaluation (PartDistillation sec. 5.1, Tables 2-3), per image:
(cluster-id map, object-class map, class-agnostic AR proposals), from a ranker model or a labels dataset."""
from __future__ import annotations

import numpy as np
import torch

from trainers.evaluation.clustering import NONE, paint_label_map
from trainers.parts.ranking import class_conditioned_parts, predict_part_labels
from trainers.structures import decode_mask, encode_masks


def object_class_map(masks: np.ndarray, classes: list[int], height: int, width: int) -> np.ndarray:
    """HxW object class of each pixel from object masks [J, H, W] (later objects paint over earlier ones, as
    ``predict_part_labels`` does); -1 on no object."""
    out = np.full((height, width), NONE, dtype=np.int64)
    for m, c in zip(masks, classes):
        out[m] = int(c)
    return out


def gt_object_union(record: dict) -> np.ndarray:
    h, w = int(record["height"]), int(record["width"])
    out = np.zeros((h, w), dtype=bool)
    for o in record.get("objects", []):
        out |= decode_mask(o["segmentation"])
    return out


def labels_predictions(record: dict, proposals: list[dict], setting: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(cluster map, object class map, AR proposals) of one eval image from a labels dataset's proposals."""
    h, w = int(record["height"]), int(record["width"])
    usable = [p for p in proposals if p.get("label") is not None and int(p["label"]) >= 0
              and p.get("category_id") is not None]
    segs = [p["segmentation"] for p in usable]
    scores = [float(p.get("score", 1.0)) for p in usable]
    clusters = paint_label_map(segs, [int(p["label"]) for p in usable], h, w, scores)
    classes = paint_label_map(segs, [int(p["category_id"]) for p in usable], h, w, scores)
    if setting == "gt":
        classes = np.where(gt_object_union(record), classes, NONE)
    return clusters, classes, [{"segmentation": p["segmentation"], "score": float(p.get("score", 1.0))}
                               for p in proposals]


@torch.no_grad()
def model_predictions(model, label_map, x: torch.Tensor, objects: list[tuple[torch.Tensor, list[int]]],
                      top_k: int) -> list[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """Per image of a same-size batch ``x``: (cluster map, object class map, AR proposals) of the ranker conditioned
    on ``objects[b] = (masks [J, H, W] bool, category ids)``."""
    h, w = x.shape[-2:]
    maps = predict_part_labels(model, x, [m for m, _ in objects], [c for _, c in objects], label_map)
    outputs = model(x.to(next(model.parameters()).device))
    out = []
    for b, (masks, classes) in enumerate(objects):
        om = masks.to(outputs["pred_masks"].device).bool()
        part_masks, scores, _ = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                        list(classes), label_map)
        order = scores.argsort(descending=True, stable=True)[:top_k]
        rles = encode_masks(part_masks[order].cpu().numpy())
        props = [{"segmentation": r, "score": float(s)} for r, s in zip(rles, scores[order].tolist())]
        out.append((maps[b], object_class_map(om.cpu().numpy(), list(classes), h, w), props))
    return out


def jsonable(v: dict) -> dict:
    return {k: ({str(pk): float(pv) for pk, pv in x.items()} if isinstance(x, dict) else float(x)) for k, x in v.items()}
