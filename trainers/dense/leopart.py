"""Leopart (Ziegler & Asano, "Self-Supervised Learning of Object Parts for Semantic Segmentation").

A ViT's patch tokens are fine-tuned with a spatially dense clustering task: an MLP head maps every token to an
embedding, prototypes score it, and the scores of each view are predicted from the optimal-transport (Sinkhorn-Knopp,
SwAV) cluster assignments of a global view after both are aligned to their common region (RoIAlign, as in
``trainers.dense.views``); with ``teacher`` (the official code's use_teacher) the targets come from an EMA of the
student instead of the student itself. The loss covers foreground tokens only, foreground being where the global view's CLS
attention (last block, mean over heads) holds the top ``fg_mass`` of its mass (DINO's attention-mass threshold).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.dense.backbone import DenseBackbone
from trainers.dense.ema import ema_update
from trainers.dense.heads import Projector, prototype_scores
from trainers.dense.views import intersection, inverse_augment


@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float = 0.05, iterations: int = 3) -> Tensor:
    """Equipartitioned soft assignments Q [N, K] of N tokens' prototype scores [N, K] (SwAV's Sinkhorn-Knopp)."""
    q = torch.exp((scores - scores.max()) / eps).T  # [K, N]
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True) * k
        q /= q.sum(0, keepdim=True) * n
    return (q * n).T


def foreground(attn: Tensor, mass: float) -> Tensor:
    """Tokens holding the top ``mass`` of the CLS attention (mean over heads): attn [B, heads, h, w] -> bool [B, 1, h, w]."""
    a = attn.mean(1).flatten(1)
    a = a / a.sum(1, keepdim=True)
    vals, idx = a.sort(1, descending=True)
    keep_sorted = (vals.cumsum(1) - vals) < mass  # include the token that crosses the threshold
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    return keep.view(attn.shape[0], 1, *attn.shape[2:])


class Leopart(nn.Module):
    """ViT backbone + MLP head + prototypes; the loss of :meth:`forward` over the global views and the local views."""

    def __init__(self, backbone: DenseBackbone, num_prototypes: int, dim: int, hidden_dim: int,
                 temperature: float = 0.1, sinkhorn_eps: float = 0.05, sinkhorn_iterations: int = 3,
                 fg_mass: float | None = 0.6, align_size: int = 7, num_global: int = 2, backbone_lr_scale: float = 1.0,
                 teacher: bool = False):
        super().__init__()
        if not backbone.vit and fg_mass is not None:
            raise ValueError(f"Leopart's foreground comes from a ViT's attention: {backbone.timm_name!r} is not a ViT "
                             "(set foreground: all to train without it)")
        self.backbone = backbone
        self.projector = Projector(backbone.dim, hidden_dim, dim, layers=3, norm=False)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))
        self.temperature, self.eps, self.iterations = temperature, sinkhorn_eps, sinkhorn_iterations
        self.fg_mass, self.align_size, self.num_global = fg_mass, align_size, num_global
        self.freeze_prototypes = False  # set per step by the stage (SwAV's freeze_prototypes_niters)
        self.backbone_lr_scale = backbone_lr_scale
        self.teacher = None
        if teacher:  # the official code's use_teacher: the targets come from an EMA of the student
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(self.projector)})
            self.teacher_prototypes = nn.Parameter(self.prototypes.detach().clone())
            for q in self.teacher_parameters():
                q.requires_grad_(False)

    def teacher_parameters(self):
        yield from self.teacher.parameters()
        yield self.teacher_prototypes

    def momentum_update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (backbone, head, prototypes)."""
        ema_update(self.teacher_parameters(),
                   [*self.backbone.parameters(), *self.projector.parameters(), self.prototypes], momentum)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, lr multiplier): the ViT at ``backbone_lr_scale`` of the head's and prototypes' lr (the official
        code's lr_backbone 1e-5 against lr_heads 1e-4), so fine-tuning refines the backbone instead of replacing it."""
        backbone = list(self.backbone.parameters())
        ids = {id(q) for q in backbone}
        return [(backbone, self.backbone_lr_scale), ([q for q in self.parameters() if id(q) not in ids and q.requires_grad], 1.0)]

    @torch.no_grad()
    def _teacher_scores(self, x: Tensor) -> Tensor:
        feats, _ = self.teacher["backbone"].features(x)
        return prototype_scores(self.teacher["projector"](feats), F.normalize(self.teacher_prototypes, dim=1))

    def forward(self, views: list[Tensor], boxes: Tensor, flips: Tensor) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():  # prototypes stay on the unit sphere (SwAV)
            self.prototypes.copy_(F.normalize(self.prototypes, dim=1))
        # frozen: a zero gradient (not none: every rank's optimizer sees the same parameters with gradients)
        protos = self.prototypes.detach() + 0.0 * self.prototypes if self.freeze_prototypes else self.prototypes
        scores, fg, targets = [], [], []
        for v, x in enumerate(views):
            feats, attn = self.backbone.features(x, attention=v < self.num_global and self.fg_mass is not None)
            scores.append(prototype_scores(self.projector(feats), protos))
            fg.append(foreground(attn, self.fg_mass).float() if attn is not None else torch.ones_like(scores[-1][:, :1]))
            if v < self.num_global:
                targets.append(self._teacher_scores(x) if self.teacher is not None else scores[-1].detach())
        losses, fg_share = [], []
        for g in range(self.num_global):
            for v in range(len(views)):
                if v == g:
                    continue
                region, valid = intersection(boxes[:, g], boxes[:, v])
                if not bool(valid.any()):
                    continue
                target_scores = inverse_augment(targets[g], boxes[:, g], flips[:, g], region, self.align_size)[valid]
                mask = inverse_augment(fg[g], boxes[:, g], flips[:, g], region, self.align_size)[valid] > 0.5
                pred = inverse_augment(scores[v], boxes[:, v], flips[:, v], region, self.align_size)[valid]
                mask = mask.permute(0, 2, 3, 1).flatten()
                fg_share.append(float(mask.float().mean()))
                if not bool(mask.any()):
                    continue
                t = target_scores.permute(0, 2, 3, 1).flatten(0, 2)
                q = sinkhorn(t[mask], self.eps, self.iterations)
                p = pred.permute(0, 2, 3, 1).flatten(0, 2)[mask]
                losses.append(-(q * F.log_softmax(p / self.temperature, -1)).sum(-1).mean())
        loss = torch.stack(losses).mean() if losses else sum(s.sum() * 0.0 for s in scores)
        spread = float(torch.cat([x.detach().std(1).flatten() for x in scores]).mean())
        return loss, {"fg_share": sum(fg_share) / max(1, len(fg_share)), "score_spread": spread}
