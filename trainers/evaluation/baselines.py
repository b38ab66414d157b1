"""Naive part proposals to calibrate the metrics: cut every object into k equal-area strips.

A proposal method that does no better than slicing objects along their major axis has learnt nothing
about parts; its AR@k is the floor the mined parts (PartDistillation sec. 4.2) must clear.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from trainers.structures import decode_mask, encode_mask


def strip_proposals(object_mask: np.ndarray, k: int = 4) -> list[np.ndarray]:
    """Cut a binary HxW mask into k strips of equal pixel count (+-1) across its major axis.

    The major axis is the first principal component of the mask's pixel coordinates; pixels are ordered
    by their projection on it (ties by the minor axis) and split into k consecutive groups, so the cuts
    are perpendicular to the major axis. The strips are disjoint and their union is the mask. A mask with
    n < k pixels gives n one-pixel strips; an empty mask gives none.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mask = np.asarray(object_mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    n = len(ys)
    if n == 0:
        return []
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
    centred = coords - coords.mean(axis=0)
    if n > 1:
        _, vecs = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: last column = major axis
        major, minor = vecs[:, 1], vecs[:, 0]
    else:
        major, minor = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    along = np.round(centred @ major, 9)  # rounding makes pixels of one cross-section exact ties
    across = np.round(centred @ minor, 9)
    order = np.lexsort((across, along))
    strips = []
    for group in np.array_split(order, min(k, n)):
        strip = np.zeros_like(mask)
        strip[ys[group], xs[group]] = True
        strips.append(strip)
    return strips


def strip_record(record: dict, k: int = 4) -> list[dict]:
    """Strip proposals for every object of a record, as ``{"object_id", "segmentation", "score", "area"}``.

    Score is the strip's share of the image, so ranking by score takes strips of larger objects first.
    """
    h, w = int(record["height"]), int(record["width"])
    proposals = []
    for obj in record.get("objects", []):
        for strip in strip_proposals(decode_mask(obj["segmentation"]), k):
            area = int(strip.sum())
            proposals.append({"object_id": obj.get("id"), "segmentation": encode_mask(strip),
                              "score": area / float(h * w), "area": area})
    return proposals


def strip_baseline(records: Iterable[dict], k: int = 4) -> Iterator[tuple[dict, list[dict]]]:
    """Stream ``(record, strip proposals)`` pairs, ready for ``PartProposalRecall.process(*pair)``."""
    for record in records:
        yield record, strip_record(record, k)


def strip_proposals_of_masks(masks, height: int, width: int, k: int) -> list[dict]:
    """Strips of detected instance masks, scored like :func:`strip_record` (share of the image)."""
    out = []
    for m in masks:
        for strip in strip_proposals(m, k):
            area = int(strip.sum())
            out.append({"object_id": None, "segmentation": encode_mask(strip), "score": area / float(height * width),
                        "area": area})
    return out
