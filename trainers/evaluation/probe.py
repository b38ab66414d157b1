"""Linear probe of dense features: a 1x1 classifier trained on frozen pixel features of a labelled split.

The standard dense-representation probe (Leopart's linear-classifier mIoU, PASS/LUSS's fine-tuning-free check):
only the linear layer learns; features are L2-normalised per pixel; prediction logits are upsampled to the image
and scored with the identity mapping (the classes are the ground truth's, no matching).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.evaluation.semantic import Confusion, Scores


class LinearProbe(nn.Module):
    """A linear map from ``dim`` features to ``num_classes`` logits, applied per pixel."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def fit(self, features: Tensor, labels: Tensor, *, epochs: int = 100, lr: float = 1e-2, batch_size: int = 4096,
            seed: int = 0) -> float:
        """AdamW with cross-entropy on (features [N, C], labels [N]); returns the last epoch's mean loss."""
        if features.shape[0] == 0:
            raise ValueError("the linear probe has no labelled pixel to train on")
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-4)
        x, y = F.normalize(features.float(), dim=1), labels.long()
        last = 0.0
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=g)
            total = 0.0
            for i in range(0, x.shape[0], batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(self.linear(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            last = total / x.shape[0]
        return last

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """Per-pixel logits [B, K, h, w] of a feature map [B, C, h, w]."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(features.float(), dim=1), self.linear.weight) + \
            self.linear.bias.view(1, -1, 1, 1)


def identity_scores(conf: Confusion) -> Scores:
    """mIoU and pixel accuracy when prediction k is class k (a probe's output): no matching."""
    counts = conf.counts
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(f"identity scoring needs as many predicted labels as classes, got {counts.shape}")
    tp = np.diag(counts).astype(np.float64)
    union = counts.sum(0) + counts.sum(1) - tp
    present = union > 0
    iou = {int(c): float(tp[c] / union[c]) for c in np.nonzero(present)[0]}
    total = float(counts.sum())
    return Scores(miou=float(np.mean(list(iou.values()))) if iou else 0.0,
                  pixel_accuracy=float(tp.sum() / total) if total else 0.0, iou=iou,
                  mapping=list(range(counts.shape[0])))
