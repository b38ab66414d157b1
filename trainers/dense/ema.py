"""EMA teachers of the dense learners (BYOL/DINO): the momentum schedule and the update."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def momentum_at(step: int, total: int, base: float) -> float:
    """The teacher momentum at ``step``: cosine from ``base`` to 1 over training (BYOL's schedule, as SlotCon)."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / max(1, total)) + 1) / 2


@torch.no_grad()
def ema_update(teacher: Iterable[Tensor], student: Iterable[Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
