"""The representation losses of PASS sec. 4.2: SwAV's clustering loss with Sinkhorn-Knopp codes, the non-contrastive
pixel-to-pixel alignment (eq. 2) and the deep-to-shallow supervision (eq. 4)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _all_reduce(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's Sinkhorn-Knopp (Caron et al. 2020, Alg. 1) over every rank's rows: ``scores`` [N, P] (prototype
    similarities of this rank's samples) -> codes [N, P], each row a distribution, the prototypes used equally
    across the whole (all-rank) batch. A collective: every rank calls it with the same P."""
    s = scores.detach().float() / epsilon
    s = s - _all_reduce(s.max().reshape(1), dist.ReduceOp.MAX if dist.is_available() else None)  # exp stays finite
    q = torch.exp(s).T  # [P, N]
    n = torch.tensor([float(q.shape[1])], device=q.device)
    total_n = float(_all_reduce(n).item())
    k = q.shape[0]
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_(min=1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_(min=1e-30)
        q /= total_n
    q *= total_n
    return q.T


def swapped_prediction(logits: list[Tensor], codes: dict[int, Tensor], temperature: float) -> Tensor:
    """SwAV's loss: for every crop i with codes q_i, the mean cross-entropy of q_i and every other crop's
    softmax(logits / T); averaged over the assigned crops."""
    loss = logits[0].new_zeros(())
    for i, q in codes.items():
        others = [v for v in range(len(logits)) if v != i]
        sub = sum(-(q * F.log_softmax(logits[v] / temperature, dim=1)).sum(1).mean() for v in others)
        loss = loss + sub / len(others)
    return loss / len(codes)


def deep_to_shallow(shallow: list[Tensor], codes: dict[int, Tensor], temperature: float) -> Tensor:
    """Eq. 4 with SwAV's loss as L_img: the shallow-stage prediction of one global view is supervised by the deep
    codes of the other view (cross-view, sec. 5.3.1 Table IX(d)). ``shallow``: the two global views' logits."""
    loss = shallow[0].new_zeros(())
    for i, q in codes.items():
        other = shallow[1 - i]
        loss = loss - (q * F.log_softmax(other / temperature, dim=1)).sum(1).mean()
    return loss / len(codes)


def pixel_to_pixel(p: Tensor, z: Tensor, valid: Tensor) -> Tensor:
    """Eq. 2: the negative cosine similarity of the predictor output of each view and the (stop-gradient) projection of
    the other view at the same image positions. ``p``, ``z`` [2B, D, S, S]; ``valid`` [B]: the views overlap."""
    b = valid.shape[0]
    if not bool(valid.any()):
        return (p.sum() + z.sum()) * 0.0  # every parameter still gets a (zero) gradient
    p1, p2 = F.normalize(p[:b], dim=1), F.normalize(p[b:], dim=1)
    z1, z2 = F.normalize(z[:b], dim=1).detach(), F.normalize(z[b:], dim=1).detach()
    sim = 0.5 * ((p1 * z2).sum(1) + (p2 * z1).sum(1))  # [B, S, S]
    return -sim[valid].mean()


@torch.no_grad()
def swav_codes(logits: list[Tensor], embeddings: Tensor, prototypes: Tensor, queue: Tensor | None, epsilon: float,
               iterations: int, crops: tuple[int, ...] = (0, 1)) -> dict[int, Tensor]:
    """Sinkhorn codes of the ``crops`` (SwAV's crops_for_assign). With a ``queue`` [len(crops), Q, D] (this rank's
    earlier embeddings of those crops), the queue joins the batch once it is full, then takes the batch's
    ``embeddings`` (crop-major [n_crops x B, D]) in, oldest out."""
    b = logits[0].shape[0]
    codes = {}
    for j, i in enumerate(crops):
        scores = logits[i].detach()
        if queue is not None and bool((queue[j, -1] != 0).any()):
            scores = torch.cat([queue[j] @ prototypes.T, scores])
        codes[i] = sinkhorn(scores, epsilon, iterations)[-b:]
        if queue is not None:
            queue[j, b:] = queue[j, :-b].clone()
            queue[j, :b] = embeddings[i * b:(i + 1) * b]
    return codes
