"""CaSP's detection pseudo-labels (Qi et al., "Class-agnostic Semi-Supervised Pretraining", sec. 3.1, eq. 1-4).

- alpha(.) (eq. 1): every object class maps to one class-free "object" (training label 0); :func:`training_targets`
  builds the engine's target function for ``objects`` (ground truth) or ``pseudo_labels`` (a labelled dataset's
  ``proposals``), class-agnostic or class-specific;
- eq. 2: a labeling detector's predictions with score > delta are an image's pseudo-labels (:func:`pseudo_labels`),
  after the non-maximum suppression that the paper's detector applies in its inference (:func:`mask_nms`, sec. 3.4:
  CondInst on FCOS, whose post-processing suppresses overlaps at IoU 0.6; docs/casp.md "Choices");
- eq. 3: images left without a pseudo-label are not part of D^p (the labeling stage drops and counts them);
- eq. 4: the target detector learns from D^p alone: :func:`pseudo_label_targets` refuses a record that carries
  ground-truth objects (:class:`GroundTruthInPseudoLabels`), so late pretraining never sees one;
- :func:`augment` is the image augmentation applied before labeling (sec. 4, "weak"/"strong" before pseudo-labeling),
  seeded by (seed, key) so a rerun writes the same bytes.

Records of a pseudo-label dataset: the input record with ``objects: []`` and ``proposals``: ``[{"segmentation",
"score", "area", "label"}]`` (``label`` 0 when class-agnostic), plus ``category_id`` when class-specific.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainers.comm import Stats
from trainers.data.batches import masks_tensor, object_targets

BINS = 10  # score histogram: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]


class GroundTruthInPseudoLabels(ValueError):
    """A record meant to hold pseudo-labels only carries ground-truth objects."""


class EmptyPseudoLabels(ValueError):
    """No prediction scored above delta on any image: D^p would be empty."""


def alpha(labels: dict[int, int]) -> dict[int, int]:
    """alpha(.) of eq. 1: every category id -> class 0 (one class-free "object")."""
    return {c: 0 for c in labels}


def pseudo_label_targets(record: dict, labels: dict[int, int] | None) -> dict[str, Tensor]:
    """SetCriterion targets from a record's pseudo-labels (``proposals``): label 0 each (``labels`` None: class-agnostic,
    eq. 4's binary targets) or ``labels[category_id]`` (class-specific pseudo-labels). A record with ground-truth
    objects is refused: late pretraining learns from pseudo-labels alone."""
    if record.get("objects"):
        raise GroundTruthInPseudoLabels(
            f"sample {record.get('image_id')!r} carries {len(record['objects'])} ground-truth object(s); a pseudo-label "
            "dataset must hold no ground truth (train on a detect-pseudo-label output of an unlabeled split)")
    proposals = record.get("proposals", [])
    h, w = int(record["height"]), int(record["width"])
    if labels is None:
        cls = [0] * len(proposals)
    else:
        try:
            cls = [labels[int(p["category_id"])] for p in proposals]
        except KeyError as e:
            raise ValueError(f"sample {record.get('image_id')!r}: a pseudo-label has no category_id {e} of the dataset "
                             "(class-specific training needs class-specific pseudo-labels)") from None
    return {"labels": torch.tensor(cls, dtype=torch.int64), "masks": masks_tensor([p["segmentation"] for p in proposals], h, w)}


def joint_targets(record: dict, labels: dict[int, int], pseudo_labels: dict[int, int] | None) -> dict[str, Tensor]:
    """Joint self-training (labeled + pseudo-labeled, CaSP Table 6): a record with ground-truth objects trains on them,
    one without on its pseudo-labels (``proposals``); never both, so a pseudo-label never overrides a ground truth."""
    if record.get("objects"):
        return object_targets(record, labels)
    return pseudo_label_targets(record, pseudo_labels)


def training_targets(targets: str, labels: dict[int, int], class_agnostic: bool):
    """The engine's target function: ground-truth ``objects``, ``pseudo_labels`` or ``joint`` (each record its ground
    truth if it has any, else its pseudo-labels), through alpha when class-agnostic. The default (objects,
    class-specific) is exactly ``object_targets`` with the dataset's labels."""
    if targets == "objects":
        return functools.partial(object_targets, labels=alpha(labels) if class_agnostic else labels)
    if targets == "joint":
        return functools.partial(joint_targets, labels=alpha(labels) if class_agnostic else labels,
                                 pseudo_labels=None if class_agnostic else labels)
    if targets != "pseudo_labels":
        raise ValueError(f"unknown targets {targets!r}: use objects, pseudo_labels or joint")
    return functools.partial(pseudo_label_targets, labels=None if class_agnostic else labels)


@dataclass
class PseudoLabelCounts(Stats):
    """Counters of a labeling pass; ``score_<i>`` histogram every prediction's score in [i/10, (i+1)/10)."""

    prefix = "pseudo/"
    images: int = 0
    images_without_labels: int = 0  # no prediction > delta: left out of D^p (eq. 3)
    predictions: int = 0
    suppressed: int = 0  # predictions above delta removed by the mask NMS (a better-scored one of its class overlaps it)
    labels: int = 0
    gt_objects_dropped: int = 0  # ground-truth objects of the input records, never copied
    forward_s: float = 0.0  # the detector's forward pass (predict: forward + mask post-processing)
    load_s: float = 0.0  # loading the detector (once per rank; outside the labeling loop)
    score_0: int = 0
    score_1: int = 0
    score_2: int = 0
    score_3: int = 0
    score_4: int = 0
    score_5: int = 0
    score_6: int = 0
    score_7: int = 0
    score_8: int = 0
    score_9: int = 0

    def count_scores(self, scores: Tensor) -> None:
        self.predictions += int(scores.numel())
        hist = torch.bincount((scores.float().clamp(0, 1) * BINS).long().clamp(max=BINS - 1).cpu(), minlength=BINS)
        for i, n in enumerate(hist.tolist()):
            setattr(self, f"score_{i}", getattr(self, f"score_{i}") + int(n))

    def histogram(self) -> list[int]:
        return [getattr(self, f"score_{i}") for i in range(BINS)]

    def derived(self) -> dict[str, float]:
        return {"labels_per_image": self.labels / max(1, self.images - self.images_without_labels),
                "kept_images_share": (self.images - self.images_without_labels) / max(1, self.images)}


def describe_scores(counts: PseudoLabelCounts) -> str:
    """The score distribution as text: ``[0.0,0.1): n, ...`` and the count above each tenth."""
    hist = counts.histogram()
    parts = [f"[{i / BINS:.1f},{(i + 1) / BINS:.1f}): {n}" for i, n in enumerate(hist) if n]
    return ", ".join(parts) or "no predictions at all"


def empty_message(delta: float, counts: PseudoLabelCounts) -> str:
    best = max((i for i, n in enumerate(counts.histogram()) if n), default=None)
    hint = (f"; the best scores lie in [{best / BINS:.1f},{(best + 1) / BINS:.1f}): lower delta below {(best + 1) / BINS:.1f} "
            "or train the labeling detector longer") if best is not None else ""
    return (f"empty pseudo-label set: no prediction scored above delta={delta:g} on any of {counts.images} image(s) "
            f"({counts.predictions} predictions; score distribution: {describe_scores(counts)}){hint}")


def mask_nms(masks: Tensor, scores: Tensor, labels: Tensor, iou: float) -> Tensor:
    """Greedy non-maximum suppression on mask IoU, per class (``labels``; one class when class-agnostic): the indices
    kept, best score first. A prediction is dropped when a better-scored one of its class overlaps it with IoU > ``iou``;
    equal scores keep the lower index. Empty masks overlap nothing."""
    n = int(scores.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    flat = masks.reshape(n, -1).float().cpu()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    overlap = torch.where(union > 0, inter / union.clamp(min=1e-9), torch.zeros_like(inter))
    same = labels.cpu()[:, None] == labels.cpu()[None, :]
    suppressed = torch.zeros(n, dtype=torch.bool)
    kept = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= same[i] & (overlap[i] > iou)
    return torch.tensor(kept, dtype=torch.int64)


def pseudo_labels(pred, delta: float, index_to_cat: dict[int, int] | None, nms_iou: float | None = None,
                  counts: PseudoLabelCounts | None = None) -> list[dict]:
    """Eq. 2: the predictions of one image with score > delta as pseudo-labels (best first), after :func:`mask_nms`
    at ``nms_iou`` (None: none). ``index_to_cat`` None: class-agnostic (label 0, no category); else each keeps its
    predicted class as ``category_id``. ``counts.suppressed`` counts what the NMS removed."""
    from trainers.structures import encode_masks

    keep = torch.nonzero(pred.scores > delta).flatten()
    if not len(keep):
        return []
    if nms_iou is not None:
        classes_above = torch.zeros_like(keep) if index_to_cat is None else pred.labels[keep]
        kept = keep[mask_nms(pred.masks[keep], pred.scores[keep], classes_above, nms_iou)]
        if counts is not None:
            counts.suppressed += len(keep) - len(kept)
        keep = kept
    masks = pred.masks[keep]
    scores, classes = pred.scores[keep].tolist(), pred.labels[keep].tolist()
    areas = masks.flatten(1).sum(1).tolist()
    out = []
    for rle, score, cls, area in zip(encode_masks(masks.cpu().numpy()), scores, classes, areas):
        if area <= 0:
            continue
        item = {"segmentation": rle, "score": float(score), "area": int(area), "label": 0 if index_to_cat is None else int(cls)}
        if index_to_cat is not None:
            item["category_id"] = int(index_to_cat[int(cls)])
        out.append(item)
    return out


def with_pseudo_labels(record: dict, labels: list[dict]) -> dict:
    """The output record: the input's fields without parts or stuff, objects emptied (never copied), ``proposals`` =
    labels."""
    out = {k: v for k, v in record.items() if k not in ("parts", "proposals", "stuff")}
    out["objects"] = []
    out["proposals"] = labels
    return out


def augment(image: np.ndarray, key: str, mode: str, seed: int = 0) -> np.ndarray:
    """The augmentation before labeling, deterministic in (seed, key). ``none``: the image; ``flip``: a horizontal flip
    with probability 0.5 (weak); ``jitter``: that flip plus brightness and contrast scaled by U(0.7, 1.3) (strong)."""
    if mode == "none":
        return image
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))
    out = image[:, ::-1] if rng.random() < 0.5 else image
    if mode == "jitter":
        x = out.astype(np.float32)
        x = x * rng.uniform(0.7, 1.3)
        mean = x.mean()
        x = (x - mean) * rng.uniform(0.7, 1.3) + mean
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)
