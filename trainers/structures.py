"""Value types that cross every boundary of the data plane: masks (COCO RLE) and the sample record.

A **sample** is one image plus one JSON annotation record, stored in a WebDataset shard as
``<key>.png`` (or ``.jpg``) and ``<key>.json``. The JSON record is::

    {
      "image_id": 17, "file_name": "train/00000017.png", "height": 112, "width": 112,
      "objects":   [ {"id": 1, "category_id": 3, "segmentation": RLE, "area": 812,
                      "bbox": [x, y, w, h], "iscrowd": 0} ],
      # datasets with stuff only (trainers.data.panoptic; categories marked "isthing": 0):
      "stuff":     [ {"id": 1, "category_id": 14, "segmentation": RLE, "area": 2301,
                      "bbox": [x, y, w, h], "iscrowd": 0} ],
      # evaluation splits only -- no training stage may read these:
      "parts":     [ {"id": 1, "object_id": 1, "category_id": 7, "segmentation": RLE,
                      "area": 120, "bbox": [x, y, w, h]} ],
      # pseudo-label datasets only (mined / predicted part proposals, class-agnostic):
      "proposals": [ {"object_id": 1, "segmentation": RLE, "score": 0.93, "area": 98,
                      "label": 0} ]
    }

RLE is COCO's compressed run-length encoding with ``counts`` as a str (JSON-safe).
Object category ids index the dataset's ``categories`` (see ``trainers.data.shards.DatasetIndex``);
part category ids index ``part_categories``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict  # {"size": [h, w], "counts": str}


def encode_mask(mask: np.ndarray) -> RLE:
    """Binary HxW mask -> compressed COCO RLE with str counts."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"encode_mask expects a 2-D mask, got shape {m.shape}")
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def encode_masks(masks: np.ndarray) -> list[RLE]:
    """NxHxW binary masks -> list of RLE (one pycocotools call)."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks expects N x H x W, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def _as_pycoco(rle: RLE) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (as COCO ships iscrowd masks)
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_mask(rle: RLE) -> np.ndarray:
    """RLE (compressed or uncompressed) -> HxW bool mask."""
    return mask_utils.decode(_as_pycoco(rle)).astype(bool)


def decode_masks(rles: list[RLE], height: int, width: int) -> np.ndarray:
    """List of RLE -> NxHxW bool array (empty list gives 0xHxW)."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([decode_mask(r) for r in rles])


def mask_area(rle: RLE) -> int:
    return int(mask_utils.area(_as_pycoco(rle)))


def mask_bbox(rle: RLE) -> list[float]:
    """[x, y, w, h] of the mask's extent (COCO convention)."""
    return [float(v) for v in mask_utils.toBbox(_as_pycoco(rle))]


def mask_iou(a: list[RLE], b: list[RLE]) -> np.ndarray:
    """IoU matrix len(a) x len(b) computed on RLE (no decoding)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(mask_utils.iou([_as_pycoco(r) for r in a], [_as_pycoco(r) for r in b], [0] * len(b)), dtype=np.float64)


def annotation_from_mask(mask: np.ndarray, **fields: Any) -> dict:
    """A COCO-style annotation dict (segmentation, area, bbox) for a binary mask plus extra fields."""
    rle = encode_mask(mask)
    return {**fields, "segmentation": rle, "area": mask_area(rle), "bbox": mask_bbox(rle)}


def masks_iou(a, b):
    """(IoU, intersection) matrices [N, M] of bool mask tensors a [N, H, W] and b [M, H, W] (torch, on their device).

    The union is clamped to 1 pixel, so empty masks give IoU 0 rather than NaN.
    """
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1, keepdim=True) + fb.sum(1)[None] - inter
    return inter / union.clamp(min=1), inter
