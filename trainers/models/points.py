"""Where mask losses and matching costs are evaluated: every target pixel, or sampled points (Mask2Former sec. 3.3).

Predictions live at stride 4 and targets at image resolution. Dense mode upsamples the mask logits
bilinearly to the target size; point mode samples both at the same normalised coordinates, uniformly
for matching and by importance (uncertain points, PointRend) for the losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(x: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of maps x [K, C, H, W] at coords [K, P, 2] in [0, 1] (x, y) -> [K, C, P]."""
    return F.grid_sample(x, 2.0 * coords.unsqueeze(2) - 1.0, mode="bilinear", align_corners=False).squeeze(3)


def dense_logits(pred_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask logits [K, h, w] upsampled to the target size and flattened -> [K, H*W]."""
    if pred_masks.shape[0] == 0:
        return pred_masks.new_zeros((0, size[0] * size[1]))
    return F.interpolate(pred_masks[:, None], size=size, mode="bilinear", align_corners=False).flatten(1)


def uncertain_point_coords(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Importance sampling (PointRend, used by Mask2Former's losses): mostly points where |logit| is small.

    mask_logits [K, 1, h, w] -> coords [K, num_points, 2] in [0, 1].
    """
    k = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(k, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, coords).abs()[:, 0]  # [K, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1)[1]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        picked = torch.cat([picked, torch.rand(k, num_random, 2, device=mask_logits.device)], dim=1)
    return picked
