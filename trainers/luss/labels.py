"""Pixel-label generation (PASS sec. 4.3): what is clustered and how every pixel gets its category.

**pixel_attention** (the method): the image-level embedding of an image is its pixel-attention enhanced feature
(the mean over pixels of norm(F) x a, eq. 6); k-means over those embeddings gives K category centroids. A pixel whose
attention (the mean of its per-channel attention maps, upsampled to the image) is below the threshold tau is 'other'
(eq. 7); every other pixel takes the generated category whose centroid is nearest (largest cosine) to its feature.

**Polarity** (a project choice, docs/luss.md "Choices"): nothing in eq. 6-7 makes the attention high on objects; it
is high on whatever tells two crops of one image apart from other images, and on a dataset whose backgrounds differ
more than its objects that is the background. The labelling stage checks it without labels by the border prior of
unsupervised saliency (objects rarely fill the image border): :func:`border_contrast` is the mean attention inside
minus on the border; negative over a sample of images means the attention is inverted, and the rule then uses
1 - a everywhere (pooling, the histogram, tau). ``LabelRule.attention_flipped`` records it so the evaluation and
prediction apply the same rule.

**pixel_kmeans** (the baseline "k-means on the raw features at the same K"): k-means with K + 1 clusters over pixel
features sampled from every image; the cluster holding the most sampled pixels is 'other' (like the attention
threshold, a choice made without labels), the others are the K categories, every pixel takes its nearest centroid.

A :class:`LabelRule` (``label_rule.json`` beside ``centroids.npy`` in a generate-labels dataset) is everything a later
stage needs to apply the same rule to other images: the evaluation applies it to the val/eval splits ("before
fine-tuning", Table XI(d)), the fine-tuning reads K from it. Label ids: 0 'other', 1..K generated categories.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from contract.io import atomic_open, write_json
from trainers.luss.model import Backbone, PixelAttention, attention_pool, output_features

RULE_FILE, CENTROIDS_FILE = "label_rule.json", "centroids.npy"
Method = Literal["pixel_attention", "pixel_kmeans"]


@dataclass
class LabelRule:
    """How a generate-labels dataset labelled its pixels; applied unchanged to any other image."""

    method: Method
    k: int  # generated categories (label ids 1..k; 0 is 'other')
    threshold: float | None  # tau (pixel_attention)
    other_cluster: int | None  # the centroid that is 'other' (pixel_kmeans)
    upsample: int  # output features = last stage upsampled this many times
    timm_name: str
    output_stride: int
    model: str | None  # the model input's URI (None: randomly initialised backbone)
    stats: dict = field(default_factory=dict)  # what the clustering reported (re-seeded clusters, cluster sizes, ...)
    attention_flipped: bool = False  # the rule uses 1 - a (the polarity check found the attention on the border)

    def save(self, folder: str | Path, centroids: np.ndarray) -> None:
        folder = Path(folder)
        with atomic_open(folder / CENTROIDS_FILE, "wb") as f:
            np.save(f, np.asarray(centroids, dtype=np.float32))
        write_json(folder / RULE_FILE, asdict(self), indent=1)

    @classmethod
    def load(cls, folder: str | Path) -> tuple["LabelRule", np.ndarray]:
        folder = Path(folder)
        try:
            doc = json.loads((folder / RULE_FILE).read_text())
            centroids = np.load(folder / CENTROIDS_FILE)
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: not a generate-labels dataset ({RULE_FILE} and {CENTROIDS_FILE}): {e}") from None
        return cls(**doc), centroids


@torch.no_grad()
def features_and_attention(backbone: Backbone, attention: PixelAttention | None, images: Tensor,
                           upsample: int, flipped: bool = False) -> tuple[Tensor, Tensor | None]:
    """Output features (normalised, [B, C, h, w]) and, with an attention module, the attention [B, C, h, w]
    (1 - the module's output when ``flipped``)."""
    feats = output_features(backbone(images)[-1], upsample)
    if attention is None:
        return feats, None
    att = attention(feats)
    return feats, (1.0 - att if flipped else att)


def border_contrast(att: Tensor, band: float = 0.125) -> Tensor:
    """Per image [B]: the mean attention (over channels) inside the image minus its mean on the border band (the outer
    ``band`` of each side, at least one feature pixel). Positive when the attention avoids the border, as objects do."""
    a = att.float().mean(1)  # [B, h, w]
    h, w = a.shape[-2:]
    bh, bw = max(1, round(h * band)), max(1, round(w * band))
    border = torch.ones(h, w, dtype=torch.bool, device=a.device)
    if h > 2 * bh and w > 2 * bw:
        border[bh:h - bh, bw:w - bw] = False
    else:  # too small for an inside: no evidence either way
        return torch.zeros(a.shape[0], device=a.device)
    return a[:, ~border].mean(1) - a[:, border].mean(1)


def image_embeddings(feats: Tensor, att: Tensor) -> Tensor:
    """The clustered image-level embeddings (sec. 4.3), L2-normalised [B, C]."""
    return F.normalize(attention_pool(feats, att), dim=1)


def sample_pixels(feats: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` random pixel features of every image ([B * count, C]), for the pixel-level k-means baseline."""
    b, c, h, w = feats.shape
    idx = torch.randint(0, h * w, (b, count), generator=generator).to(feats.device)
    flat = feats.flatten(2)  # [B, C, hw]
    return flat.gather(2, idx[:, None, :].expand(b, c, count)).permute(0, 2, 1).reshape(-1, c)


def attention_histogram(att: Tensor, bins: int = 256) -> np.ndarray:
    """Counts of the per-pixel mean attention in ``bins`` equal bins over [0, 1] (for the Otsu threshold)."""
    return torch.histc(att.mean(1).float().flatten().cpu(), bins=bins, min=0.0, max=1.0).numpy().astype(np.int64)


def otsu_threshold(hist: np.ndarray) -> float:
    """The threshold on [0, 1] that maximises the between-class variance of a histogram (Otsu 1979)."""
    hist = np.asarray(hist, dtype=np.float64)
    bins = len(hist)
    centers = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float((np.argmax(between[:-1]) + 1) / bins) if bins > 1 else 0.5


@torch.no_grad()
def label_maps(rule: LabelRule, centroids: Tensor, feats: Tensor, att: Tensor | None, size: tuple[int, int]) -> Tensor:
    """Sec. 4.3's rule on a batch: label ids [B, H, W] (int64; 0 'other', 1..K) at image size ``size``."""
    c = F.normalize(centroids.to(feats.device, feats.dtype), dim=1)
    nearest = torch.einsum("bchw,kc->bkhw", feats, c).argmax(1)  # [B, h, w]
    if rule.method == "pixel_attention":
        labels = nearest + 1
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        if att is None:
            raise ValueError("the pixel_attention rule needs the attention maps")
        a = F.interpolate(att.mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)[:, 0]
        return labels.masked_fill_(a < float(rule.threshold), 0)
    # pixel_kmeans: the 'other' cluster -> 0, the others -> 1..K in centroid order
    lut = torch.empty(rule.k + 1, dtype=torch.long, device=feats.device)
    others = [i for i in range(rule.k + 1) if i != rule.other_cluster]
    lut[rule.other_cluster] = 0
    lut[torch.tensor(others, device=feats.device)] = torch.arange(1, rule.k + 1, device=feats.device)
    labels = lut[nearest]
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def labels_to_proposals(labels: np.ndarray, att: np.ndarray | None = None) -> list[dict]:
    """One record entry per generated category present (RLE mask, ``label`` = its id 1..K, ``score`` = its mean
    attention or 1); 'other' pixels belong to none. The label map is recovered by painting them."""
    from trainers.structures import annotation_from_mask

    out = []
    for k in np.unique(labels):
        if k == 0:
            continue
        m = labels == k
        score = float(att[m].mean()) if att is not None else 1.0
        out.append({**annotation_from_mask(m), "label": int(k), "score": score})
    return out


def proposals_to_labels(record: dict) -> np.ndarray:
    """A generated-labels record back to its label map (int64; 0 'other')."""
    from trainers.structures import decode_mask

    out = np.zeros((int(record["height"]), int(record["width"])), dtype=np.int64)
    for p in record.get("proposals", []):
        out[decode_mask(p["segmentation"])] = int(p["label"])
    return out
