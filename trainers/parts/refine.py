"""Optional refinement of mined parts: mean-field label smoothing with colour affinities (a dense-CRF in miniature).

Mined clusters follow stride-4 features, so their borders are soft; image colour is sharp. A few mean-field
iterations over a local window, with bilateral weights ``exp(-|p_i - p_j|^2 / 2 s_xy^2 - |I_i - I_j|^2 / 2 s_rgb^2)``
restricted to the instance mask, pull each pixel's label towards its similar-coloured neighbours (the Potts
message of Krähenbühl & Koltun's dense CRF, on a window instead of the full image). Vectorised with ``unfold``
on the instance's bounding box.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def refine_labels(image: Tensor, ys: Tensor, xs: Tensor, labels: Tensor, k: int, iters: int = 5, window: int = 5,
                  sigma_xy: float = 2.0, sigma_rgb: float = 0.1, unary_confidence: float = 0.7,
                  weight: float = 3.0) -> Tensor:
    """Smoothed labels of the mask pixels (ys, xs) of ``image`` [3, H, W] (uint8 or float in [0, 1]).

    ``labels`` [M] in [0, k) are the k-means assignment; its one-hot (confidence ``unary_confidence``) is the
    unary term, ``weight`` scales the pairwise message. Returns [M] labels in [0, k).
    """
    if k < 2 or labels.numel() == 0:
        return labels
    y0, x0 = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
    img = image[:, y0:y0 + h, x0:x0 + w].float().contiguous()
    if image.dtype == torch.uint8:
        img = img / 255.0
    inside = torch.zeros(h, w, dtype=torch.bool, device=labels.device)
    inside[ys - y0, xs - x0] = True
    # unary: log of a soft one-hot of the k-means labels
    other = (1 - unary_confidence) / (k - 1)
    unary = torch.full((k, h, w), other, device=labels.device)
    unary[labels, ys - y0, xs - x0] = unary_confidence
    unary = unary.log()

    pad = window // 2
    r = torch.arange(-pad, pad + 1, device=labels.device, dtype=torch.float32)
    spatial = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma_xy ** 2)).flatten()  # [W*W]
    spatial[(window * window) // 2] = 0.0  # no message to itself
    cols = F.unfold(img[None], window, padding=pad).view(3, window * window, h * w)  # neighbours' colours
    centre = img.reshape(3, 1, h * w)
    colour = torch.exp(-((cols - centre) ** 2).sum(0) / (2 * sigma_rgb ** 2))  # [W*W, h*w]
    nb_inside = F.unfold(inside[None, None].float(), window, padding=pad).view(window * window, h * w)
    affinity = spatial[:, None] * colour * nb_inside  # [W*W, h*w]
    affinity = affinity / affinity.sum(0, keepdim=True).clamp(min=1e-6)

    q = unary.softmax(0)
    for _ in range(iters):
        q_nb = F.unfold((q * inside).unsqueeze(0), window, padding=pad).view(k, window * window, h * w)
        message = (q_nb * affinity[None]).sum(1).view(k, h, w)
        q = (unary + weight * message).softmax(0)
    return q[:, ys - y0, xs - x0].argmax(0)
