"""Set-prediction losses (Mask2Former sec. 3.3 / 4.1, after DETR and MaskFormer).

After Hungarian matching: cross-entropy on class logits (the no-object class weighted by eos_coef)
for all queries, sigmoid BCE + dice on the matched masks, repeated on every intermediate prediction
(deep supervision). PartDistillation sec. 4.2 trains the class-agnostic part decoder with the same
objective and num_classes = 1.

Targets: one dict per image, ``labels`` LongTensor [M] and ``masks`` bool/float [M, H, W] at image
resolution (all images of a batch share H, W). Mask logits at stride 4 are upsampled to H, W (dense
mode) or both are point-sampled (``num_points > 0``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.models.config import LossConfig
from trainers.models.matcher import HungarianMatcher
from trainers.models.points import dense_logits, point_sample, uncertain_point_coords


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 - soft dice per matched mask pair [K, P], summed and divided by num_masks."""
    p = logits.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Per-point sigmoid BCE of matched pairs [K, P], averaged over points, summed over masks / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def _num_masks(targets: list[dict], device: torch.device) -> float:
    """Targets per rank averaged over ranks, as Mask2Former normalises (at least 1)."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """Matches, then computes loss_ce, loss_mask, loss_dice (+ ``_<i>`` per aux prediction) and the weighted ``loss``."""

    def __init__(self, num_classes: int, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.num_points)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}

    def loss_labels(self, pred_logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """CE over all queries: matched ones to their target class, the rest to no-object (index num_classes)."""
        target_classes = torch.full(pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=pred_logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(pred_logits.device)] = targets[b]["labels"][tgt].to(pred_logits.device)
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, self.empty_weight.float())

    def loss_masks(
        self, pred_masks: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]], num_masks: float
    ) -> tuple[Tensor, Tensor]:
        """Sigmoid BCE and dice of the matched masks, dense at target size or at importance-sampled points."""
        src = torch.cat([pred_masks[b, s.to(pred_masks.device)] for b, (s, _) in enumerate(indices)]).float()
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)]).to(src)
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected when a batch has no targets
            return zero, zero
        if self.cfg.num_points > 0:
            with torch.no_grad():
                coords = uncertain_point_coords(
                    src[:, None], self.cfg.num_points, self.cfg.oversample_ratio, self.cfg.importance_sample_ratio
                )
                tgt_points = point_sample(tgt[:, None], coords)[:, 0]
            src_points = point_sample(src[:, None], coords)[:, 0]
        else:
            tgt_points = tgt.flatten(1)
            src_points = dense_logits(src, tuple(tgt.shape[-2:]))
        return sigmoid_ce_loss(src_points, tgt_points, num_masks), dice_loss(src_points, tgt_points, num_masks)

    def _single(self, outputs: dict, targets: list[dict], num_masks: float) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        return {"loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices), "loss_mask": loss_mask, "loss_dice": loss_dice}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        labels = torch.cat([t["labels"].flatten() for t in targets])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"target labels must lie in [0, {self.num_classes}), got {labels.unique().tolist()}")
        num_masks = _num_masks(targets, outputs["pred_logits"].device)
        predictions = [("", outputs)]
        if self.cfg.deep_supervision:
            predictions += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses: dict[str, Tensor] = {}
        total = outputs["pred_logits"].new_zeros(())
        for suffix, pred in predictions:
            for name, value in self._single(pred, targets, num_masks).items():
                losses[name + suffix] = value
                total = total + self.weights[name] * value
        losses["loss"] = total
        return losses


def set_loss(engine, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Engine ``loss_fn`` of a Segmenter: the SetCriterion total plus its last-layer terms as metrics."""
    images, targets = batch
    dtype = next(p for p in engine.module.parameters()).dtype
    outputs = engine(images.to(dtype))
    losses = engine.module.loss(outputs, targets)
    return losses["loss"], {k: float(losses[k].detach()) for k in ("loss_ce", "loss_mask", "loss_dice")}
