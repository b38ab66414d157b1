"""A query-based segmentation model: encoder E + masked-attention decoder + set criterion + inference.

PartDistillation sec. 4.1: the instance teacher is ``Segmenter(cfg)`` with an object decoder D^o; the
part model reuses the teacher's frozen encoder with a class-agnostic decoder D^p::

    teacher = Segmenter(SegmenterConfig(decoder=DecoderConfig(num_classes=n_objects)))
    parts = Segmenter(SegmenterConfig(decoder=DecoderConfig(num_classes=1), freeze_encoder=True),
                      encoder=teacher.encoder)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.models.config import SegmenterConfig
from trainers.models.decoder import MaskedTransformerDecoder
from trainers.models.encoder import Encoder
from trainers.models.losses import SetCriterion
from trainers.structures import RLE, encode_masks


@dataclass
class InstancePredictions:
    """Top-k predictions of one image, sorted by score (highest first)."""

    scores: Tensor  # [K] class probability x mask quality
    labels: Tensor  # [K] class index in [0, num_classes)
    masks: Tensor  # [K, H, W] bool at image size
    query_features: Tensor  # [K, D] decoded query vector f_i (PartDistillation sec. 4.1)
    query_indices: Tensor  # [K] which query produced each prediction

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_rle(self) -> list[RLE]:
        """Masks as COCO RLE (``trainers.structures.encode_masks``)."""
        return encode_masks(self.masks.cpu().numpy())


@torch.no_grad()
def postprocess(outputs: dict, image_size: tuple[int, int], top_k: int) -> list[InstancePredictions]:
    """Mask2Former instance inference: top-k (query, class) pairs by softmax prob, rescored by mask quality.

    Score = p(class) x mean sigmoid inside the binary mask (logit > 0); masks upsampled to ``image_size``.
    """
    results = []
    logits, masks, feats = outputs["pred_logits"], outputs["pred_masks"], outputs["query_features"]
    num_classes = logits.shape[-1] - 1
    for b in range(logits.shape[0]):
        probs = logits[b].float().softmax(-1)[:, :-1]  # [N, C]
        k = min(top_k, probs.numel())
        cls_scores, flat = probs.flatten().topk(k)
        labels, queries = flat % num_classes, torch.div(flat, num_classes, rounding_mode="floor")
        mask_logits = F.interpolate(masks[b, queries][None].float(), size=image_size, mode="bilinear", align_corners=False)[0]
        binary = mask_logits > 0
        quality = (mask_logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = cls_scores * quality
        order = scores.argsort(descending=True)
        results.append(
            InstancePredictions(
                scores=scores[order],
                labels=labels[order],
                masks=binary[order],
                query_features=feats[b, queries[order]],
                query_indices=queries[order],
            )
        )
    return results


class Segmenter(nn.Module):
    """Encoder + MaskedTransformerDecoder + SetCriterion; ``encoder`` may be shared (and frozen) with another model."""

    def __init__(self, cfg: SegmenterConfig | None = None, encoder: Encoder | None = None):
        super().__init__()
        cfg = cfg or SegmenterConfig()
        if encoder is not None:  # the shared encoder defines the encoder config
            cfg = cfg.model_copy(update={"encoder": encoder.cfg})
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else Encoder(cfg.encoder)
        self.decoder = MaskedTransformerDecoder(
            cfg.decoder, in_channels=cfg.encoder.pixel_dim, mask_dim=cfg.encoder.mask_dim,
            num_levels=len(cfg.encoder.strides) - 1,
        )
        self.criterion = SetCriterion(cfg.decoder.num_classes, cfg.loss)
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if self.cfg.freeze_encoder:  # fixed E keeps its normalisation statistics (PartDistillation sec. 4.1)
            self.encoder.eval()
        return self

    def forward(self, images: Tensor) -> dict:
        """images [B, 3, H, W] (uint8 or float in [0, 1]) -> decoder outputs (see MaskedTransformerDecoder)."""
        if self.cfg.freeze_encoder:
            with torch.no_grad():
                feats = self.encoder(images)
        else:
            feats = self.encoder(images)
        return self.decoder(feats.multi_scale, feats.mask_features)

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Weighted total under ``"loss"`` plus each term (see SetCriterion)."""
        return self.criterion(outputs, targets)

    def pixel_features(self, images: Tensor) -> list[Tensor]:
        """Per-pixel features for part mining (PartDistillation sec. 4.2), fine to coarse.

        [0] the mask features at stride 4 (the penultimate layer), then the FPN levels at strides 8, 16, ...
        """
        feats = self.encoder(images)
        return [feats.mask_features, *feats.multi_scale[::-1]]

    @torch.no_grad()
    def predict(self, images: Tensor, top_k: int | None = None) -> list[InstancePredictions]:
        """Top-k scored masks per image at the images' size (eval mode is the caller's job)."""
        return postprocess(self(images), tuple(images.shape[-2:]), top_k or self.cfg.top_k)
