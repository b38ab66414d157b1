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

**LUSS protocols** (PASS sec. 3.2 and its supplementary 7.1; ImageNet-S's own evaluation tooling): label 0 is the
'other' category on both sides, generated categories are ``1..K``, ground-truth categories ``1..C``.

- :func:`image_level_matching` -- the fully unsupervised protocol's default matching (eq. 1): a matching matrix
  counting the images whose *set* of generated categories holds i while their ground-truth set holds j ('other'
  left out of both sets), solved one-to-one by the Hungarian algorithm; 'other' is matched to 'other'. A
  :class:`MatchingMatrix` accumulates it image by image (the matching pass).
- :class:`LussScores` -- the scoring pass over label maps already mapped to ground-truth ids: mIoU with 'other'
  included, boundary mIoU (Boundary IoU, Cheng et al. 2021: the inner band of width ``d`` = ``ratio`` x image
  diagonal), Img-Acc (the mapped category with the largest area is among the image's ground-truth categories; an
  all-'other' prediction is wrong), F-beta (beta^2 = 0.3, foreground = any category but 'other', averaged over
  images) and mIoU per object-size group (S <= 5%, M.S. <= 25%, M.L. <= 50%, L; 'other' pixels in every group).
- :class:`DistanceMatching` -- the distance-matching protocol: category embeddings averaged per (labeled image,
  category), each pixel labelled by a vote of its top-k most similar embeddings.
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


# -- LUSS (PASS sec. 3.2) --------------------------------------------------------------------------------------------
OTHER = 0  # the 'other' category: generated id 0 and ground-truth id 0
SIZE_GROUPS = ("S", "MS", "ML", "L")  # object size over image size: (0, 5%], (5, 25%], (25, 50%], (50, 100%]
SIZE_BOUNDS = (5, 25, 50)  # percent, upper bounds of S, MS, ML (sec. 3.1.2)


def category_sets(labels: np.ndarray, ignore: int = IGNORE) -> set[int]:
    """The categories of one label map, 'other' and ``ignore`` left out."""
    present = np.unique(np.asarray(labels))
    return {int(v) for v in present if v != OTHER and v != ignore and v >= 0}


class MatchingMatrix:
    """PASS eq. 1: ``counts[i, j]`` = images whose generated categories include i and ground-truth categories include j."""

    def __init__(self, n_pred: int, n_gt: int, ignore: int = IGNORE) -> None:
        if n_pred < 1 or n_gt < 1:
            raise ValueError(f"a matching matrix needs at least one generated and one ground-truth id, got {n_pred}x{n_gt}")
        self.n_pred, self.n_gt, self.ignore = n_pred, n_gt, ignore
        self.counts = np.zeros((n_pred, n_gt), dtype=np.int64)
        self.images = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One image: its generated label map (ids 0..n_pred-1) and ground-truth map (0..n_gt-1, ``ignore``)."""
        p = sorted(category_sets(pred, ignore=-1))
        g = sorted(category_sets(gt, self.ignore))
        for i in p:
            if i >= self.n_pred:
                raise ValueError(f"generated label {i} outside 0..{self.n_pred - 1}")
        for j in g:
            if j >= self.n_gt:
                raise ValueError(f"ground-truth label {j} outside 0..{self.n_gt - 1} (and not ignore={self.ignore})")
        if p and g:
            self.counts[np.ix_(p, g)] += 1
        self.images += 1

    def merge(self, other: "MatchingMatrix") -> None:
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge a {other.counts.shape} matching matrix into {self.counts.shape}")
        self.counts += other.counts
        self.images += other.images


def image_level_matching(counts: np.ndarray) -> np.ndarray:
    """Generated id -> ground-truth id: 'other' to 'other', the rest one-to-one by the Hungarian algorithm on the
    matching matrix (maximising matched image counts); -1 for generated ids left unmatched (K > C)."""
    counts = np.asarray(counts)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[OTHER] = OTHER
    if counts.shape[0] > 1 and counts.shape[1] > 1:
        rows, cols = linear_sum_assignment(counts[1:, 1:], maximize=True)
        mapping[rows + 1] = cols + 1
    return mapping


def apply_mapping(pred: np.ndarray, mapping: np.ndarray | list[int]) -> np.ndarray:
    """A generated label map in ground-truth ids (-1 where the generated id maps to nothing)."""
    m = np.asarray(mapping, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= len(m)):
        raise ValueError(f"generated label outside 0..{len(m) - 1}")
    return m[pred]


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Boundary IoU's inner band: mask pixels within ``width`` px of the outside (the image border counts as outside)."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), iterations=max(1, int(width)), border_value=0)
    return mask & ~inner


def boundary_width(height: int, width: int, ratio: float) -> int:
    """Band width in pixels: ``ratio`` of the image diagonal, at least 1 (Boundary IoU's dilation)."""
    return max(1, int(round(ratio * float(np.hypot(height, width)))))


class LussScores:
    """The scoring pass of the LUSS metrics over ``n_classes`` ground-truth ids (0 = 'other'), summed image by image.

    ``add(pred, gt)`` takes a prediction already in ground-truth ids (values -1..n_classes-1; -1: a generated category
    matched to nothing, counted against every class) and the ground truth (``ignore`` pixels never count).
    """

    def __init__(self, n_classes: int, boundary_ratio: float = 0.02, beta2: float = 0.3, ignore: int = IGNORE) -> None:
        if n_classes < 2:
            raise ValueError(f"LUSS scores need 'other' and at least one category, got {n_classes} ids")
        self.n, self.ratio, self.beta2, self.ignore = n_classes, boundary_ratio, beta2, ignore
        z = lambda: np.zeros(n_classes, dtype=np.int64)  # noqa: E731
        self.tp, self.pred, self.gt = z(), z(), z()  # pixel counts per class: intersection, predicted, ground truth
        self.btp, self.bpred, self.bgt = z(), z(), z()  # the same over the boundary bands
        self.size_tp = np.zeros((len(SIZE_GROUPS), n_classes), dtype=np.int64)
        self.size_pred, self.size_gt = np.zeros_like(self.size_tp), np.zeros_like(self.size_tp)
        self.images = 0
        self.img_correct = 0
        self.all_other = 0  # images predicted entirely 'other'
        self.fbeta_sum = 0.0

    def _hist(self, values: np.ndarray) -> np.ndarray:
        v = values[(values >= 0) & (values < self.n)]
        return np.bincount(v, minlength=self.n)[: self.n].astype(np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray, raw_foreground: np.ndarray | None = None) -> None:
        """One image. ``raw_foreground`` (optional): the prediction's non-'other' pixels before mapping (F-beta ignores
        categories); by default the pixels of ``pred`` that are not 'other' (an unmatched category, -1, is foreground)."""
        pred = np.asarray(pred, dtype=np.int64)
        gt = np.asarray(gt, dtype=np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction is {pred.shape}, ground truth {gt.shape}")
        valid = gt != self.ignore
        bad = valid & ((gt < 0) | (gt >= self.n))
        if bad.any():
            raise ValueError(f"ground-truth label {int(gt[bad][0])} outside 0..{self.n - 1} (and not ignore={self.ignore})")
        if ((pred < -1) | (pred >= self.n)).any():
            raise ValueError(f"mapped prediction outside -1..{self.n - 1}")
        p, g = pred[valid], gt[valid]
        hit = p == g
        self.tp += self._hist(g[hit])
        self.pred += self._hist(p)
        self.gt += self._hist(g)
        # boundary IoU: per class, the inner bands of the predicted and ground-truth masks
        h, w = gt.shape
        width = boundary_width(h, w, self.ratio)
        for c in np.unique(np.concatenate([np.unique(p), np.unique(g)])):
            if c < 0:
                continue
            pb = boundary_band(pred == c, width) & valid
            gb = boundary_band(gt == c, width) & valid
            self.btp[c] += int((pb & gb).sum())
            self.bpred[c] += int(pb.sum())
            self.bgt[c] += int(gb.sum())
        # mIoU per object size: 'other' pixels plus the pixels of the categories of one size group
        area = np.bincount(g, minlength=self.n)
        total = max(1, gt.size)
        group_of = {int(c): int(np.searchsorted(SIZE_BOUNDS, int(np.ceil(100.0 * area[c] / total)), side="left"))
                    for c in np.nonzero(area)[0] if c != OTHER}
        for s in set(group_of.values()):
            keep = (g == OTHER) | np.isin(g, [c for c, gs in group_of.items() if gs == s])
            ps, gs_ = p[keep], g[keep]
            self.size_tp[s] += self._hist(gs_[ps == gs_])
            self.size_pred[s] += self._hist(ps)
            self.size_gt[s] += self._hist(gs_)
        # Img-Acc: the largest predicted category (not 'other') must be one of the image's categories
        areas = self._hist(p)
        areas[OTHER] = 0
        if areas.sum() == 0:
            self.all_other += 1
        else:
            self.img_correct += int(area[int(areas.argmax())] > 0)
        # F-beta on foreground ('any category') vs 'other'
        fg_pred = (pred != OTHER) if raw_foreground is None else np.asarray(raw_foreground, dtype=bool)
        fp, fg = fg_pred[valid], g != OTHER
        tp = float((fp & fg).sum())
        precision, recall = tp / (fp.sum() + 1e-20), tp / (fg.sum() + 1e-20)
        self.fbeta_sum += (1 + self.beta2) * precision * recall / (self.beta2 * precision + recall + 1e-20)
        self.images += 1

    def merge(self, other: "LussScores") -> None:
        for name in ("tp", "pred", "gt", "btp", "bpred", "bgt", "size_tp", "size_pred", "size_gt"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.images += other.images
        self.img_correct += other.img_correct
        self.all_other += other.all_other
        self.fbeta_sum += other.fbeta_sum

    def state(self) -> np.ndarray:
        """Every counter as one float64 vector (summed over ranks by an all-reduce); :meth:`from_state` inverts it."""
        parts = [self.tp, self.pred, self.gt, self.btp, self.bpred, self.bgt, self.size_tp.ravel(), self.size_pred.ravel(),
                 self.size_gt.ravel(), np.array([self.images, self.img_correct, self.all_other, self.fbeta_sum])]
        return np.concatenate([np.asarray(x, dtype=np.float64) for x in parts])

    def load_state(self, vec: np.ndarray) -> "LussScores":
        vec = np.asarray(vec, dtype=np.float64)
        n, g = self.n, len(SIZE_GROUPS)
        pos = 0
        for name in ("tp", "pred", "gt", "btp", "bpred", "bgt"):
            setattr(self, name, np.rint(vec[pos: pos + n]).astype(np.int64))
            pos += n
        for name in ("size_tp", "size_pred", "size_gt"):
            setattr(self, name, np.rint(vec[pos: pos + g * n]).astype(np.int64).reshape(g, n))
            pos += g * n
        self.images, self.img_correct, self.all_other = (int(round(v)) for v in vec[pos: pos + 3])
        self.fbeta_sum = float(vec[pos + 3])
        return self

    @staticmethod
    def _miou(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray, over: np.ndarray) -> tuple[float, np.ndarray]:
        union = (pred + gt - tp).astype(np.float64)
        iou = np.divide(tp, union, out=np.zeros_like(union), where=union > 0)
        return (float(iou[over].mean()) if over.any() else 0.0), iou

    def result(self) -> dict[str, float]:
        """``miou`` (classes with pixels in the ground truth or the prediction, 'other' included), ``boundary_miou``,
        ``img_acc``, ``fbeta``, ``miou_<S|MS|ML|L>`` (classes present in that group; absent when no image had a category
        of that size), ``iou_<c>``, ``other_iou``,
        ``images``, ``images_all_other``, ``pixel_accuracy``."""
        miou, iou = self._miou(self.tp, self.pred, self.gt, (self.pred + self.gt) > 0)
        bmiou, _ = self._miou(self.btp, self.bpred, self.bgt, (self.bpred + self.bgt) > 0)
        out = {"miou": miou, "boundary_miou": bmiou,
               "img_acc": self.img_correct / self.images if self.images else 0.0,
               "fbeta": self.fbeta_sum / self.images if self.images else 0.0,
               "pixel_accuracy": float(self.tp.sum() / max(1, self.gt.sum())),
               "other_iou": float(iou[OTHER]), "images": float(self.images), "images_all_other": float(self.all_other)}
        for s, name in enumerate(SIZE_GROUPS):  # a group no image had a category of is left out
            if self.size_gt[s].any():
                out[f"miou_{name}"], _ = self._miou(self.size_tp[s], self.size_pred[s], self.size_gt[s], self.size_gt[s] > 0)
        for c in range(1, self.n):
            if self.gt[c] + self.pred[c]:
                out[f"iou_{c}"] = float(iou[c])
        return out


class DistanceMatching:
    """PASS sec. 3.2.1, distance matching: a bank of category embeddings (the mean feature of every ground-truth
    category, 'other' included, in every labeled image) and a top-k vote of the most similar ones for each pixel."""

    def __init__(self, top_k: int = 10) -> None:
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.top_k = top_k
        self.embeddings: list[np.ndarray] = []
        self.labels: list[int] = []

    def add_image(self, features: np.ndarray, gt: np.ndarray, ignore: int = IGNORE) -> None:
        """``features [D, h, w]`` of one labeled image and its ground truth resized to ``h x w``."""
        f = np.asarray(features, dtype=np.float32)
        if f.shape[1:] != np.asarray(gt).shape:
            raise ValueError(f"features are {f.shape[1:]}, ground truth {np.asarray(gt).shape}")
        flat, g = f.reshape(f.shape[0], -1), np.asarray(gt).ravel()
        for c in np.unique(g):
            if c == ignore:
                continue
            e = flat[:, g == c].mean(axis=1)
            n = np.linalg.norm(e)
            if np.isfinite(n) and n > 0:
                self.embeddings.append(e / n)
                self.labels.append(int(c))

    def bank(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.embeddings:
            raise ValueError("distance matching needs at least one labeled image with a category")
        return np.stack(self.embeddings).astype(np.float32), np.asarray(self.labels, dtype=np.int64)

    @staticmethod
    def vote(features: np.ndarray, bank: np.ndarray, labels: np.ndarray, top_k: int) -> np.ndarray:
        """``features [D, h, w]`` (any norm) -> labels ``[h, w]``: the most frequent label among the ``top_k`` most
        cosine-similar bank embeddings (ties: the label of the most similar one)."""
        f = np.asarray(features, dtype=np.float32)
        d, h, w = f.shape
        x = f.reshape(d, -1).T
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ bank.T  # [hw, n]
        k = min(top_k, bank.shape[0])
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((x.shape[0], int(labels.max()) + 1), dtype=np.float64)
        np.add.at(votes, (np.repeat(np.arange(x.shape[0]), k), labels[top].ravel()), 1.0)
        best = labels[sim.argmax(1)]
        votes[np.arange(x.shape[0]), best] += 0.5  # the nearest embedding breaks ties
        return votes.argmax(1).reshape(h, w)
