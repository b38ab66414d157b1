"""Unsupervised semantic segmentation scored against ground truth: one streaming confusion matrix, then matching.

Shared by the dense-representation pipelines (PASS/LUSS sec. 3.2, SlotCon's COCO-Stuff-27 protocol, Leopart):
predicted label maps carry arbitrary cluster ids ``0..n_pred-1``; ground-truth maps carry category indices
``0..n_gt-1`` and ``ignore`` (255) for unlabeled pixels, which are never counted. A :class:`Confusion` is filled
image by image (``add``), merged across ranks (``merge``) and then scored with a mapping from clusters to
ground-truth categories:

- **hungarian**: one-to-one, maximising the matched pixel counts (scipy ``linear_sum_assignment``, as the PASS
  and SlotCon evaluation code match on the confusion matrix); clusters left over map to nothing (their pixels
  are false positives of no class, i.e. they count against pixel accuracy and against no class's IoU);
- **many_to_one** (overclustering, K larger than the ground-truth count): every cluster to the category it
  overlaps most.

Metrics are fractions in [0, 1]: ``miou`` (mean over ground-truth categories present in the ground truth or
predicted after mapping), ``pixel_accuracy`` (matched pixels over labeled pixels), ``iou`` per category and the
``mapping`` (cluster -> category, -1 for none).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

IGNORE = 255


class Confusion:
    """Pixel counts ``counts[pred, gt]`` of an ``n_pred`` x ``n_gt`` labeling pair; ``ignore`` pixels are skipped."""

    def __init__(self, n_pred: int, n_gt: int, ignore: int = IGNORE) -> None:
        if n_pred < 1 or n_gt < 1:
            raise ValueError(f"a confusion matrix needs at least one predicted and one ground-truth label, got {n_pred}x{n_gt}")
        self.n_pred, self.n_gt, self.ignore = n_pred, n_gt, ignore
        self.counts = np.zeros((n_pred, n_gt), dtype=np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one image: ``pred`` and ``gt`` label maps of the same shape."""
        pred, gt = np.asarray(pred).ravel().astype(np.int64), np.asarray(gt).ravel().astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
        keep = gt != self.ignore
        pred, gt = pred[keep], gt[keep]
        bad_gt = (gt < 0) | (gt >= self.n_gt)
        if bad_gt.any():
            raise ValueError(f"ground-truth label {int(gt[bad_gt][0])} outside 0..{self.n_gt - 1} (and not ignore={self.ignore})")
        bad_pred = (pred < 0) | (pred >= self.n_pred)
        if bad_pred.any():
            raise ValueError(f"predicted label {int(pred[bad_pred][0])} outside 0..{self.n_pred - 1}")
        self.counts += np.bincount(pred * self.n_gt + gt, minlength=self.n_pred * self.n_gt).reshape(self.n_pred, self.n_gt)

    def merge(self, other: "Confusion") -> None:
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge a {other.counts.shape} confusion matrix into {self.counts.shape}")
        self.counts += other.counts


@dataclass
class Scores:
    miou: float
    pixel_accuracy: float
    iou: dict[int, float] = field(default_factory=dict)  # ground-truth category index -> IoU
    mapping: list[int] = field(default_factory=list)  # cluster -> ground-truth category index, -1 for none

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/miou": self.miou, f"{prefix}/pixel_accuracy": self.pixel_accuracy}


def hungarian(counts: np.ndarray) -> np.ndarray:
    """Cluster -> category, one-to-one, maximising matched pixels; -1 for clusters left unmatched."""
    counts = np.asarray(counts)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping[rows] = cols
    return mapping


def many_to_one(counts: np.ndarray) -> np.ndarray:
    """Cluster -> the category it overlaps most (overclustering); -1 for clusters with no labeled pixel."""
    counts = np.asarray(counts)
    return np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)


def score(conf: Confusion | np.ndarray, how: str = "hungarian") -> Scores:
    """mIoU and pixel accuracy after mapping clusters to categories (``hungarian`` or ``many_to_one``)."""
    counts = np.asarray(conf.counts if isinstance(conf, Confusion) else conf, dtype=np.int64)
    if how == "hungarian":
        mapping = hungarian(counts)
    elif how == "many_to_one":
        mapping = many_to_one(counts)
    else:
        raise ValueError(f"unknown matching {how!r}: use 'hungarian' or 'many_to_one'")
    n_gt = counts.shape[1]
    merged = np.zeros((n_gt + 1, n_gt), dtype=np.int64)  # row n_gt: pixels of clusters mapped to nothing
    np.add.at(merged, np.where(mapping >= 0, mapping, n_gt), counts)
    tp = np.diag(merged[:n_gt]).astype(np.float64)
    gt_sizes = merged.sum(axis=0).astype(np.float64)
    pred_sizes = merged[:n_gt].sum(axis=1).astype(np.float64)
    union = gt_sizes + pred_sizes - tp
    present = union > 0
    iou = {int(c): float(tp[c] / union[c]) for c in np.nonzero(present)[0]}
    total = float(gt_sizes.sum())
    return Scores(miou=float(np.mean(list(iou.values()))) if iou else 0.0,
                  pixel_accuracy=float(tp.sum() / total) if total else 0.0,
                  iou=iou, mapping=[int(m) for m in mapping])
