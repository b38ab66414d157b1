"""SlotCon (Wen et al., "Self-Supervised Visual Representation Learning with Semantic Grouping", and its supplement).

Pixels are grouped into slots by learnable prototypes (semantic grouping); a student and an EMA teacher see two
views; the grouping loss is a per-pixel cross-entropy between the student's assignment of one view and the
teacher's (centred, sharpened) assignment of the other, after the inverse augmentation aligned the two assignment
maps (supplement A.1; Table 3c: applied to the assignments, the default); the group-level loss is a slot-level
contrastive loss between the student's slots of one view (through a predictor) and the teacher's slots of the
other, over the slots active in both (the binary indicator, supplement D), with every other slot in the batch a
negative (Table 3b: contrastive, the default). No image-level loss (Table 3d, batch 512: without).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.dense.backbone import DenseBackbone
from trainers.dense.ema import ema_update
from trainers.dense.heads import Projector, prototype_scores
from trainers.dense.views import intersection, inverse_augment


def _gather(t: Tensor) -> Tensor:
    """``t`` of every rank concatenated along dim 0 (no gradient; every rank has the same shape)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


class SlotCon(nn.Module):
    """Student (backbone, projector, prototypes, slot predictor) + EMA teacher (backbone, projector, prototypes)."""

    def __init__(self, backbone: DenseBackbone, num_prototypes: int, dim: int, hidden_dim: int,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, center_momentum: float = 0.9,
                 contrast_temp: float = 0.2, group_loss_weight: float = 0.5, align_size: int = 7):
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(backbone.dim, hidden_dim, dim, layers=3, norm=True)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))
        self.predictor = nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, dim))
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_projector = copy.deepcopy(self.projector)
        self.teacher_prototypes = nn.Parameter(self.prototypes.detach().clone())
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.contrast_temp, self.group_loss_weight, self.align_size = contrast_temp, group_loss_weight, align_size

    def teacher_parameters(self):
        yield from self.teacher_backbone.parameters()
        yield from self.teacher_projector.parameters()
        yield self.teacher_prototypes

    def student_parameters(self):
        yield from self.backbone.parameters()
        yield from self.projector.parameters()
        yield self.prototypes

    def momentum_update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (BYOL/DINO EMA)."""
        ema_update(self.teacher_parameters(), self.student_parameters(), momentum)

    def _group(self, z: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """Semantic grouping: (slots [B, K, D] = attention-weighted means of the pixel embeddings, scores [B, K, h, w])."""
        scores = prototype_scores(z, prototypes)
        attn = (scores / self.teacher_temp).softmax(1) + 1e-6  # the grouping attention of the paper's code
        slots = torch.einsum("bdhw,bkhw->bkd", z, attn / attn.sum((2, 3), keepdim=True))
        return slots, scores

    def forward(self, views: list[Tensor], boxes: Tensor, flips: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The SlotCon loss of a batch of two views; returns (loss, parts of it)."""
        x1, x2 = views[0], views[1]
        q1, s_q1 = self._group(self.projector(self.backbone(x1)), self.prototypes)
        q2, s_q2 = self._group(self.projector(self.backbone(x2)), self.prototypes)
        with torch.no_grad():
            k1, s_k1 = self._group(self.teacher_projector(self.teacher_backbone(x1)), self.teacher_prototypes)
            k2, s_k2 = self._group(self.teacher_projector(self.teacher_backbone(x2)), self.teacher_prototypes)
        region, valid = intersection(boxes[:, 0], boxes[:, 1])
        a = {n: inverse_augment(s, boxes[:, v], flips[:, v], region, self.align_size)[valid]
             for n, s, v in (("q1", s_q1, 0), ("q2", s_q2, 1), ("k1", s_k1, 0), ("k2", s_k2, 1))}
        group = 0.5 * (self._distill(a["q1"], a["k2"]) + self._distill(a["q2"], a["k1"]))
        self._update_center(torch.cat([s_k1, s_k2]))
        contrast = 0.5 * (self._contrast(q1, k2, s_q1, s_k2) + self._contrast(q2, k1, s_q2, s_k1))
        loss = self.group_loss_weight * group + (1 - self.group_loss_weight) * contrast
        active = float((F.one_hot(s_k1.argmax(1), s_k1.shape[1]).sum((1, 2)) > 0).sum(1).float().mean())
        return loss, {"loss_group": float(group.detach()), "loss_contrast": float(contrast.detach()), "active_slots": active}

    def _distill(self, q: Tensor, k: Tensor) -> Tensor:
        """Per-pixel cross-entropy: teacher's centred, sharpened assignment -> student's assignment (both [N, K, s, s])."""
        if q.shape[0] == 0:
            return q.sum() * 0.0
        q = q.permute(0, 2, 3, 1).flatten(0, 2)
        k = k.permute(0, 2, 3, 1).flatten(0, 2)
        target = ((k - self.center) / self.teacher_temp).softmax(-1)
        return -(target * F.log_softmax(q / self.student_temp, -1)).sum(-1).mean()

    @torch.no_grad()
    def _update_center(self, scores: Tensor) -> None:
        batch = scores.permute(0, 2, 3, 1).flatten(0, 2).mean(0, keepdim=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)
            batch /= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch, alpha=1 - self.center_momentum)

    def _contrast(self, q: Tensor, k: Tensor, s_q: Tensor, s_k: Tensor) -> Tensor:
        """InfoNCE over slots: student slot k of one view (through the predictor) vs the teacher's slot k of the other;
        only slots active (argmax of some pixel) in both views are queries; keys: every active teacher slot of every rank."""
        b, n = s_q.shape[:2]
        active_q = (F.one_hot(s_q.argmax(1), n).sum((1, 2)) > 0).flatten()
        active_k = (F.one_hot(s_k.argmax(1), n).sum((1, 2)) > 0).flatten()
        rank = dist.get_rank() if dist.is_initialized() else 0
        all_k, all_active = _gather(F.normalize(k.flatten(0, 1), dim=1)), _gather(active_k)
        queries = (active_q & active_k).nonzero().squeeze(-1)
        if queries.numel() == 0:
            return sum(p.sum() * 0.0 for p in self.predictor.parameters()) + q.sum() * 0.0
        keys = all_active.nonzero().squeeze(-1)
        logits = F.normalize(self.predictor(q.flatten(0, 1)), dim=1)[queries] @ all_k[keys].T / self.contrast_temp
        labels = all_active.long().cumsum(0)[queries + b * n * rank] - 1
        return F.cross_entropy(logits, labels) * (2 * self.contrast_temp)
