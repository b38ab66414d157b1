"""Label maps of a split for the LUSS evaluation (PASS sec. 3.2): what each protocol predicts with.

A predictor maps a batch of same-size images ([B, 3, H, W] in [0, 1]) to label maps [B, H, W] and says how many
label ids it uses (``num_labels``, 'other' = 0 included):

- :class:`HeadPredictor` -- a fine-tuned model's segmentation head, argmax of the upsampled logits (eq. 8);
- :class:`RulePredictor` -- a generate-labels dataset's rule applied to new images with the same model (the
  labels "before fine-tuning", and the k-means baselines);
- :class:`DistancePredictor` -- the distance-matching protocol: category embeddings of a few labeled images,
  a top-k vote per pixel (``trainers.evaluation.semantic.DistanceMatching``); its labels are ground-truth ids.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.data.batches import images_to_tensor, iter_same_size
from trainers.data.imagenet_s import class_indices, semantic_map
from trainers.evaluation.semantic import DistanceMatching
from trainers.luss.labels import LabelRule, features_and_attention, label_maps
from trainers.luss.model import PixelAttention, SegmentationModel, backbone_from, output_features, output_stride_of


class HeadPredictor:
    def __init__(self, doc: dict, device):
        extra = doc["extra"]
        self.num_labels = int(extra["num_classes"])
        self.model = SegmentationModel(doc["timm_name"], output_stride_of(doc), self.num_labels)
        self.model.backbone.net.load_state_dict(doc["state_dict"])
        self.model.head.load_state_dict(extra["segmentation_head"])
        self.model = self.model.to(device).eval()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images)


class RulePredictor:
    def __init__(self, doc: dict, rule: LabelRule, centroids: np.ndarray, device):
        if doc["timm_name"] != rule.timm_name:
            raise ValueError(f"the labels were generated with {rule.timm_name!r}, the candidate is {doc['timm_name']!r}")
        self.rule, self.num_labels = rule, rule.k + 1
        self.backbone = backbone_from(doc).to(device).eval()
        self.attention = None
        if rule.method == "pixel_attention":
            if "pixel_attention" not in doc["extra"]:
                raise ValueError("the labels' rule needs the pixel-attention model; the candidate has no pixel_attention")
            self.attention = PixelAttention(self.backbone.out_channels)
            self.attention.load_state_dict(doc["extra"]["pixel_attention"])
            self.attention = self.attention.to(device).eval()
        self.centroids = torch.from_numpy(np.asarray(centroids)).float().to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feats, att = features_and_attention(self.backbone, self.attention, images, self.rule.upsample,
                                            self.rule.attention_flipped)
        return label_maps(self.rule, self.centroids, feats, att, tuple(images.shape[-2:]))


def _resize_nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """A label map sampled at the centres of an ``h x w`` grid."""
    ys = ((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64)
    return labels[np.ix_(ys, xs)]


class DistancePredictor:
    def __init__(self, doc: dict, labeled: str, num_labels: int, top_k: int, upsample: int, device, batch_size: int = 16):
        self.backbone = backbone_from(doc).to(device).eval()
        self.upsample, self.top_k, self.num_labels = upsample, top_k, num_labels
        from trainers.data import shards

        classes = class_indices(shards.DatasetIndex.load(labeled).categories)
        dm = DistanceMatching(top_k)
        for group in iter_same_size(labeled, batch_size, allow_parts=True):  # every rank: the same (few) images
            feats = self._features(images_to_tensor([g[2] for g in group]).to(device))
            for f, g in zip(feats, group):
                gt = semantic_map(g[3], classes)
                dm.add_image(f, _resize_nearest(gt, f.shape[1], f.shape[2]))
        self.bank, self.labels = dm.bank()

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> np.ndarray:
        return output_features(self.backbone(images)[-1], self.upsample).float().cpu().numpy()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feats = self._features(images)
        small = torch.from_numpy(np.stack([DistanceMatching.vote(f, self.bank, self.labels, self.top_k) for f in feats]))
        return F.interpolate(small[:, None].float(), size=tuple(images.shape[-2:]), mode="nearest")[:, 0].long()
