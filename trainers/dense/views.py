"""Augmented views with their geometry, and the inverse augmentation that aligns their feature maps.

SlotCon supplement A.1: the two views of an image come from a random resized crop and a random horizontal flip;
since each view's crop box is known, the part of each view's (feature or assignment) map where the two boxes
intersect is cut out with RoIAlign and resized to a fixed size, and a flipped view's cut is flipped back, so the
two aligned maps are pixel-to-pixel correspondent. Leopart aligns its crops' patch tokens the same way. Views
never read labels: a sample's record is not looked at.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align


def random_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
               rng: random.Random | None = None) -> tuple[float, float, float, float]:
    """A crop box (x0, y0, x1, y1) in pixels covering ``scale`` of the image area at an aspect ratio in ``ratio``."""
    rng = rng or random
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 1 <= w <= width and 1 <= h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    side = min(height, width) * math.sqrt(scale[1])  # fallback: a centred square
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def crop_view(image: Tensor, box: tuple[float, float, float, float], size: int, flip: bool) -> Tensor:
    """The view of ``image`` [3, H, W] (float) inside ``box``, resized to ``size`` x ``size`` (bilinear), maybe flipped."""
    boxes = torch.tensor([[0.0, *box]], dtype=image.dtype)
    out = roi_align(image[None], boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
    return out.flip(-1) if flip else out


def color_jitter(view: Tensor, strength: float, gray_prob: float, rng: random.Random) -> Tensor:
    """Photometric augmentation of a [3, H, W] view in [0, 1]: brightness, contrast, saturation; sometimes grayscale."""
    if strength > 0:
        b, c, s = (1 + rng.uniform(-strength, strength) for _ in range(3))
        view = view * b
        mean = view.mean()
        view = (view - mean) * c + mean
        gray = (0.299 * view[0] + 0.587 * view[1] + 0.114 * view[2])[None]
        view = (view - gray) * s + gray
    if rng.random() < gray_prob:
        view = (0.299 * view[0] + 0.587 * view[1] + 0.114 * view[2])[None].expand(3, -1, -1)
    return view.clamp(0, 1).contiguous()


class MultiViewTransform:
    """Engine transform: (key, image, record) -> (views, boxes [V, 4], flips [V]); the record is never read.

    View v is a crop of ``scales[v]`` of the image area resized to ``sizes[v]``; every view after the first is
    resampled (up to 20 times) until its box overlaps the first view's.
    """

    def __init__(self, sizes: list[int], scales: list[tuple[float, float]], flip_prob: float = 0.5,
                 jitter: float = 0.4, gray_prob: float = 0.2):
        if len(sizes) != len(scales) or len(sizes) < 2:
            raise ValueError("MultiViewTransform needs at least two views, a size and a scale for each")
        self.sizes, self.scales, self.flip_prob, self.jitter, self.gray_prob = sizes, scales, flip_prob, jitter, gray_prob
        self.rng = random.Random()

    def __call__(self, sample) -> tuple[list[Tensor], Tensor, Tensor]:
        _, image, _record = sample
        self.rng.seed(int(np.random.randint(0, 2**31 - 1)))  # follows the engine's per-rank seed
        img = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float().div_(255.0)
        h, w = img.shape[-2:]
        boxes, flips, views = [], [], []
        for v, (size, scale) in enumerate(zip(self.sizes, self.scales)):
            for _ in range(20):
                box = random_box(h, w, scale, rng=self.rng)
                if v == 0 or _overlap(box, boxes[0]) > 0:
                    break
            flip = self.rng.random() < self.flip_prob
            boxes.append(box)
            flips.append(flip)
            views.append(color_jitter(crop_view(img, box, size, flip), self.jitter, self.gray_prob, self.rng))
        return views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips, dtype=torch.bool)


def collate_views(items: list[tuple[list[Tensor], Tensor, Tensor]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """A batch: views as a list of [B, 3, s_v, s_v], boxes [B, V, 4], flips [B, V]."""
    views, boxes, flips = zip(*items)
    return [torch.stack([vs[v] for vs in views]) for v in range(len(views[0]))], torch.stack(boxes), torch.stack(flips)


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def intersection(box_a: Tensor, box_b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample intersection boxes [B, 4] of two views' crop boxes [B, 4], and whether it is non-empty [B]."""
    inter = torch.cat([torch.maximum(box_a[:, :2], box_b[:, :2]), torch.minimum(box_a[:, 2:], box_b[:, 2:])], 1)
    valid = (inter[:, 2] > inter[:, 0] + 1e-3) & (inter[:, 3] > inter[:, 1] + 1e-3)
    return inter, valid


def inverse_augment(maps: Tensor, box: Tensor, flip: Tensor, region: Tensor, out_size: int) -> Tensor:
    """The part of each view's map [B, C, h, w] (view crop ``box`` [B, 4], ``flip`` [B]) inside ``region`` [B, 4]
    (image pixels), resized to ``out_size`` x ``out_size`` with RoIAlign and flipped back: supplement A.1."""
    b, _, h, w = maps.shape
    sx = w / (box[:, 2] - box[:, 0]).clamp(min=1e-6)
    sy = h / (box[:, 3] - box[:, 1]).clamp(min=1e-6)
    x0, x1 = (region[:, 0] - box[:, 0]) * sx, (region[:, 2] - box[:, 0]) * sx
    y0, y1 = (region[:, 1] - box[:, 1]) * sy, (region[:, 3] - box[:, 1]) * sy
    fx0 = torch.where(flip, w - x1, x0)  # a flipped view holds the region mirrored
    fx1 = torch.where(flip, w - x0, x1)
    rois = torch.stack([torch.arange(b, dtype=maps.dtype, device=maps.device), fx0, y0, fx1, y1], 1).to(maps.dtype)
    out = roi_align(maps, rois, output_size=(out_size, out_size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
