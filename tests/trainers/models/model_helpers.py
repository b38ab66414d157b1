"""Shared fixtures of the model tests: a tiny config and a synthetic batch of coloured rectangles."""
from __future__ import annotations

import torch

from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig

TINY_ENCODER = EncoderConfig(backbone="test_convnext", pixel_dim=32, mask_dim=32, norm_groups=8)


def tiny_config(num_classes: int = 3, **decoder) -> SegmenterConfig:
    """A model that runs a step in tens of milliseconds on one core."""
    dec = dict(num_classes=num_classes, num_queries=8, hidden_dim=32, num_heads=4, dim_feedforward=64, num_layers=3)
    return SegmenterConfig(encoder=TINY_ENCODER, decoder=DecoderConfig(**{**dec, **decoder}))


COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.3, 0.9]])
BOXES = [  # per image: (x0, y0, x1, y1, class) on a 112 grid; later boxes occlude earlier ones
    [(8, 8, 50, 60, 0), (60, 20, 104, 56, 1), (30, 70, 90, 104, 2)],
    [(10, 60, 60, 100, 1), (64, 10, 100, 90, 0)],
]


def rectangles_batch(size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """2 images [2, 3, size, size] in [0, 1] of noisy coloured rectangles; targets with labels and visible masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g) * 0.2
    targets = []
    for b, boxes in enumerate(BOXES):
        masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1, c) in enumerate(boxes):
            x0, y0, x1, y1 = (int(v * size / 112) for v in (x0, y0, x1, y1))
            masks[i, y0:y1, x0:x1] = True
            masks[:i, y0:y1, x0:x1] = False
            n = int(masks[i].sum())
            images[b][:, masks[i]] = COLOURS[c][:, None] + 0.05 * torch.rand(3, n, generator=g)
        targets.append({"labels": torch.tensor([c for *_, c in boxes]), "masks": masks})
    return images, targets


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every mask in a [K, H, W] with every mask in b [M, H, W] -> [K, M]."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=1)
