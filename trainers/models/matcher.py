"""Hungarian matching of predictions to targets, one image at a time (Mask2Former sec. 3.3, after DETR).

Cost = class_weight * (-p(class)) + mask_weight * sigmoid-BCE + dice_weight * dice, solved with
``scipy.optimize.linear_sum_assignment``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from trainers.models.points import dense_logits, point_sample


def batch_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice cost of every prediction [N, P] (logits) against every target [M, P] in {0, 1} -> [N, M]."""
    p = logits.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean per-point sigmoid BCE of every prediction [N, P] against every target [M, P] -> [N, M].

    BCE(x, t) = softplus(-x) + x * (1 - t), so the pairwise sum is one softplus and one matmul.
    """
    neg_log_p = F.softplus(-logits)  # BCE against t = 1
    return (neg_log_p.sum(-1, keepdim=True) + logits.sum(-1, keepdim=True) - logits @ targets.T) / logits.shape[-1]


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a [N, M] cost: (pred indices, target indices), min(N, M) pairs."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher:
    """Matches each image's N queries to its M targets by class + BCE + dice cost."""

    def __init__(self, class_weight: float = 1.0, mask_weight: float = 20.0, dice_weight: float = 1.0, num_points: int = 0):
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        """pred_logits [N, C+1], pred_masks [N, h, w] (logits), labels [M], masks [M, H, W] -> cost [N, M]."""
        pred_masks, masks = pred_masks.float(), masks.to(pred_masks.device, torch.float32)
        cost_class = -pred_logits.float().softmax(-1)[:, labels.to(pred_logits.device)]
        if self.num_points > 0:  # the same uniform points for all predictions and targets
            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
            tgt = point_sample(masks[:, None], coords.expand(masks.shape[0], -1, -1))[:, 0]
            out = point_sample(pred_masks[:, None], coords.expand(pred_masks.shape[0], -1, -1))[:, 0]
        else:
            tgt = masks.flatten(1)
            out = dense_logits(pred_masks, tuple(masks.shape[-2:]))
        return (
            self.class_weight * cost_class
            + self.mask_weight * batch_sigmoid_ce_cost(out, tgt)
            + self.dice_weight * batch_dice_cost(out, tgt)
        )

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B, N, C+1], pred_masks [B, N, h, w]; targets: per image {labels [M], masks [M, H, W]}."""
        indices = []
        for b, tgt in enumerate(targets):
            if len(tgt["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], tgt["labels"], tgt["masks"])
            indices.append(hungarian(cost))
        return indices

