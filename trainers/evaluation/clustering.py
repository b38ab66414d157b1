"""NMI, ARI and mIoU of discovered part clusters against annotated parts (PartDistillation sec. 5.1, Tables 2-3).

Cluster ids are arbitrary and per object class, so every metric is computed per object class from one
streaming contingency table (predicted cluster x GT part category, pixel counts) and then averaged:

- **NMI / ARI** (Choudhury et al. protocol, Table 2): over the foreground pixels of the class, i.e. pixels
  of GT objects of that class that carry a GT part label; a pixel the prediction leaves unassigned counts
  as one more cluster ("none").
- **mIoU** (Table 3): each cluster is mapped to a GT part, by **majority** overlap (the reference:
  PartDistillation's ``mIOU_Matcher``; several clusters may map to one part and are merged) or by
  **Hungarian** one-to-one matching on the cluster/part IoU matrix; then the IoU of each GT part against the
  union of its clusters over all pixels of the table (predicted pixels on background or on other parts
  are false positives). ``miou`` averages parts within a class, then classes (the reference's C-mIoU);
  ``miou_parts`` averages all (class, part) pairs (A-mIoU).

Metrics are fractions in [0, 1] (the paper prints percentages).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from trainers.structures import RLE, decode_mask

NONE = -1  # row key: pixel left unassigned by the prediction; column key: pixel with no GT part (background)


class Contingency:
    """A growable table of pixel counts keyed by (predicted label, GT label); keys are arbitrary ints."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.cols: dict[int, int] = {}
        self.counts = np.zeros((0, 0), dtype=np.int64)

    def _place(self, pred_keys: np.ndarray, gt_keys: np.ndarray, counts: np.ndarray) -> None:
        """Add a block of counts whose rows/columns are the given keys, growing the table for new keys."""
        for keys, values in ((self.rows, pred_keys), (self.cols, gt_keys)):
            for v in values.tolist():
                keys.setdefault(int(v), len(keys))
        if self.counts.shape != (len(self.rows), len(self.cols)):
            grown = np.zeros((len(self.rows), len(self.cols)), dtype=np.int64)
            grown[:self.counts.shape[0], :self.counts.shape[1]] = self.counts
            self.counts = grown
        ri = [self.rows[int(v)] for v in pred_keys.tolist()]
        ci = [self.cols[int(v)] for v in gt_keys.tolist()]
        self.counts[np.ix_(ri, ci)] += counts

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count the label pairs ``(pred[i], gt[i])``."""
        pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
        if pred.size == 0:
            return
        pu, pi = np.unique(pred, return_inverse=True)
        gu, gi = np.unique(gt, return_inverse=True)
        local = np.bincount(pi.ravel() * len(gu) + gi.ravel(), minlength=len(pu) * len(gu))
        self._place(pu, gu, local.reshape(len(pu), len(gu)).astype(np.int64))

    def merge(self, other: "Contingency") -> None:
        self._place(np.asarray(list(other.rows), dtype=np.int64), np.asarray(list(other.cols), dtype=np.int64),
                    other.counts)

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row keys, column keys, counts), keys sorted ascending."""
        rk = np.asarray(sorted(self.rows), dtype=np.int64)
        ck = np.asarray(sorted(self.cols), dtype=np.int64)
        counts = self.counts[np.ix_([self.rows[int(k)] for k in rk], [self.cols[int(k)] for k in ck])]
        return rk, ck, counts


def _nonempty(table: np.ndarray) -> np.ndarray:
    table = np.asarray(table)
    return table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]


def nmi_from_contingency(table: np.ndarray) -> float:
    """Normalized mutual information (arithmetic mean of entropies), equal to sklearn's
    ``normalized_mutual_info_score`` on the labelings the table counts."""
    c = _nonempty(table).astype(np.float64)
    if c.shape[0] == c.shape[1] <= 1:  # neither labeling splits the data (or no data): a perfect match
        return 1.0
    if c.shape[0] == 1 or c.shape[1] == 1:
        return 0.0
    n = c.sum()
    a, b = c.sum(axis=1), c.sum(axis=0)
    i, j = np.nonzero(c)
    v = c[i, j]
    terms = (v / n) * (np.log(v) + math.log(n) - np.log(a[i]) - np.log(b[j]))
    mi = float(np.clip(np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms).sum(), 0.0, None))
    if mi == 0.0:
        return 0.0
    h_a = float(-(a / n * np.log(a / n)).sum())
    h_b = float(-(b / n * np.log(b / n)).sum())
    return mi / ((h_a + h_b) / 2.0)


def ari_from_contingency(table: np.ndarray) -> float:
    """Adjusted Rand index from the pair-confusion counts of the table, equal to sklearn's
    ``adjusted_rand_score``; exact integer arithmetic (pixel counts overflow int64 when squared and summed)."""
    t = np.asarray(table, dtype=np.int64)
    cells = [int(x) for x in t.ravel()]
    n = sum(cells)
    sum_sq = sum(x * x for x in cells)
    pred_sq = sum(int(x) ** 2 for x in t.sum(axis=1))  # rows: one labeling, columns: the other (ARI is symmetric)
    gt_sq = sum(int(x) ** 2 for x in t.sum(axis=0))
    tp = sum_sq - n          # pairs together in both
    fp = pred_sq - sum_sq    # together in the first only
    fn = gt_sq - sum_sq      # together in the second only
    tn = n * n - tp - fp - fn - n
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def majority_mapping(overlap: np.ndarray) -> np.ndarray:
    """Cluster -> part index by largest pixel overlap (reference); -1 for a cluster that overlaps no part."""
    mapping = np.asarray(overlap).argmax(axis=1) if overlap.shape[1] else np.zeros(len(overlap), dtype=np.int64)
    return np.where(np.asarray(overlap).sum(axis=1) > 0, mapping, -1)


def hungarian_mapping(overlap: np.ndarray, cluster_sizes: np.ndarray, part_sizes: np.ndarray) -> np.ndarray:
    """Cluster -> part index, one-to-one, maximising total IoU (scipy ``linear_sum_assignment``);
    -1 for clusters left unmatched or matched with IoU 0."""
    overlap = np.asarray(overlap, dtype=np.float64)
    union = cluster_sizes[:, None] + part_sizes[None, :] - overlap
    iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
    mapping = np.full(len(overlap), -1, dtype=np.int64)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] > 0
    mapping[rows[keep]] = cols[keep]
    return mapping


def part_ious(counts: np.ndarray, row_keys: np.ndarray, col_keys: np.ndarray, how: str) -> dict[int, float]:
    """IoU of every GT part (by category id) of one object class after mapping clusters to parts."""
    parts = np.nonzero((col_keys != NONE) & (counts.sum(axis=0) > 0))[0]
    clusters = np.nonzero(row_keys != NONE)[0]
    overlap = counts[np.ix_(clusters, parts)]
    cluster_sizes = counts[clusters].sum(axis=1).astype(np.float64)  # every pixel a cluster claims
    part_sizes = counts[:, parts].sum(axis=0).astype(np.float64)      # every pixel of a part
    if how == "majority":
        mapping = majority_mapping(overlap)
    elif how == "hungarian":
        mapping = hungarian_mapping(overlap, cluster_sizes, part_sizes)
    else:
        raise ValueError(f"unknown mapping {how!r}: use 'majority' or 'hungarian'")
    out = {}
    for j, part in enumerate(parts):
        mine = mapping == j
        tp = float(overlap[mine, j].sum())
        union = part_sizes[j] + float(cluster_sizes[mine].sum()) - tp
        out[int(col_keys[part])] = tp / union
    return out


def gt_label_maps(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(object class map, part category map) of an evaluation record, HxW int64, -1 where none.

    Part pixels take the class of the part's object; later annotations paint over earlier ones.
    """
    h, w = int(record["height"]), int(record["width"])
    obj_class = np.full((h, w), NONE, dtype=np.int64)
    part = np.full((h, w), NONE, dtype=np.int64)
    class_of = {}
    for obj in record.get("objects", []):
        class_of[obj.get("id")] = int(obj["category_id"])
        obj_class[decode_mask(obj["segmentation"])] = int(obj["category_id"])
    for p in record.get("parts", []):
        m = decode_mask(p["segmentation"])
        part[m] = int(p["category_id"])
        if p.get("object_id") in class_of:
            obj_class[m] = class_of[p["object_id"]]
    return obj_class, part


def paint_label_map(segmentations: Sequence[RLE], labels: Sequence[int], height: int, width: int,
                    scores: Sequence[float] | None = None) -> np.ndarray:
    """HxW int64 label map from predicted masks (-1 where none); where masks overlap the higher score wins."""
    out = np.full((height, width), NONE, dtype=np.int64)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable") if scores is not None \
        else np.arange(len(segmentations))
    for i in order:  # ascending score: the best mask is painted last
        out[decode_mask(segmentations[i])] = int(labels[i])
    return out


class PartClusteringEvaluator:
    """Per object class NMI, ARI and mIoU (majority and Hungarian mapping) of predicted part clusters.

    ``process(record_gt, pred_label_map, object_class_map=None)``:

    - ``record_gt``: an evaluation sample record with ``objects`` and ``parts`` (``trainers.structures``).
    - ``pred_label_map``: HxW int, the predicted part cluster id of each pixel, -1 for background /
      unassigned. Cluster ids are per object class (cluster 3 of "dog" and of "car" are unrelated).
    - ``object_class_map``: HxW int, the object class whose clusters ``pred_label_map`` holds at each pixel
      (-1: none; a cluster id there is ignored). ``None`` means the GT object classes: the "with GT object
      masks" setting, where predictions outside GT objects are dropped. For "without", pass the class map
      of the model's own object masks; one evaluator per setting.

    Streams: keeps one small contingency table per object class. ``evaluate()`` keys: ``nmi``, ``ari``,
    ``miou``, ``miou_parts``, ``miou_hungarian``, ``miou_hungarian_parts``, ``num_classes``;
    ``per_class()`` gives the per-class numbers of Table 2.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tables: dict[int, Contingency] = {}

    def process(self, record_gt: dict, pred_label_map: np.ndarray, object_class_map: np.ndarray | None = None) -> None:
        gt_class, gt_part = gt_label_maps(record_gt)
        pred = np.asarray(pred_label_map, dtype=np.int64)
        pred_class = gt_class if object_class_map is None else np.asarray(object_class_map, dtype=np.int64)
        if pred.shape != gt_class.shape or pred_class.shape != gt_class.shape:
            raise ValueError(f"label maps {pred.shape}/{pred_class.shape} do not match the record's "
                             f"{gt_class.shape} (height, width)")
        assigned = (pred_class != NONE) & (pred != NONE)
        classes = np.union1d(np.unique(gt_class[gt_class != NONE]), np.unique(pred_class[assigned]))
        for c in classes.tolist():
            mine = assigned & (pred_class == c)
            sel = (gt_class == c) | mine
            rows = np.where(mine[sel], pred[sel], NONE)
            cols = np.where(gt_class[sel] == c, gt_part[sel], NONE)
            self.tables.setdefault(int(c), Contingency()).add(rows, cols)

    def merge(self, other: "PartClusteringEvaluator") -> None:
        """Add another evaluator's counts (e.g. one per rank) into this one."""
        for c, table in other.tables.items():
            self.tables.setdefault(c, Contingency()).merge(table)

    def per_class(self) -> dict[int, dict[str, Any]]:
        """Object class -> ``nmi``, ``ari``, ``miou``, ``miou_hungarian`` (floats) and ``miou_per_part``,
        ``miou_hungarian_per_part`` ({part category id: IoU}); classes without GT part pixels are left out."""
        out = {}
        for c in sorted(self.tables):
            rk, ck, counts = self.tables[c].table()
            fg = counts[:, ck != NONE]
            if fg.sum() == 0:
                continue
            res: dict[str, Any] = {"nmi": nmi_from_contingency(fg), "ari": ari_from_contingency(fg)}
            for how, key in (("majority", "miou"), ("hungarian", "miou_hungarian")):
                ious = part_ious(counts, rk, ck, how)
                res[key] = float(np.mean(list(ious.values())))
                res[f"{key}_per_part"] = ious
            out[c] = res
        return out

    def evaluate(self) -> dict[str, float]:
        per = self.per_class()
        keys = ("nmi", "ari", "miou", "miou_parts", "miou_hungarian", "miou_hungarian_parts")
        if not per:
            return {**{k: 0.0 for k in keys}, "num_classes": 0.0}
        out = {k: float(np.mean([r[k] for r in per.values()])) for k in ("nmi", "ari", "miou", "miou_hungarian")}
        for key in ("miou", "miou_hungarian"):
            out[f"{key}_parts"] = float(np.mean([v for r in per.values() for v in r[f"{key}_per_part"].values()]))
        out["num_classes"] = float(len(per))
        return {k: out[k] for k in (*keys, "num_classes")}
