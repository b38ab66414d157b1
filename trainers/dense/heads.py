"""Per-pixel heads shared by the dense methods: a 1x1-conv MLP projector and L2-normalised prototypes."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Projector(nn.Module):
    """1x1-conv MLP ``in_dim -> hidden_dim (x layers-1) -> out_dim`` on a feature map [B, C, h, w].

    ``norm``: BatchNorm after each hidden conv (SlotCon's projector, after DINO's head with BN); without it, GELU
    only (Leopart's MLP head).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3, norm: bool = True):
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden_dim": hidden_dim, "out_dim": out_dim, "layers": layers, "norm": norm}
        mods: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for i in range(layers):
            mods.append(nn.Conv2d(dims[i], dims[i + 1], 1))
            if i < layers - 1:
                if norm:
                    mods.append(nn.BatchNorm2d(dims[i + 1]))
                mods.append(nn.ReLU(inplace=True) if norm else nn.GELU())
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Projector":
        return cls(**config)


def prototype_scores(z: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every pixel embedding z [B, D, h, w] to every prototype [K, D]: [B, K, h, w]."""
    return torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), F.normalize(prototypes, dim=1))
