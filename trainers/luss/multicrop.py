"""Multi-crop views (SwAV; PASS sec. 5.1) and where the two global views overlap (the P2P alignment's pixel pairs).

A view is a random resized crop (area fraction in ``scale``, aspect ratio in [3/4, 4/3]), possibly mirrored, resampled
to a square of ``size`` pixels by ``grid_sample`` (sub-pixel boxes, crop + resize + flip in one step), with a mild
brightness/contrast jitter. Colour is left alone otherwise: in PartWorld a part's colour family is part of what
makes its class. For the two global views an ``S x S`` grid of points covering their overlap is returned in each
view's normalised coordinates (``grid_sample`` convention, ``align_corners=False``), so sampling both views' pixel
features there pairs the features of the same image positions (eq. 2); views that do not overlap are marked invalid.

Only the image reaches these transforms: :class:`ImagesOnly` drops the record before anything else, so a training
stage built on them cannot read a label even when its shards carry some.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class ImagesOnly:
    """Engine transform: ``(key, image, record)`` -> ``fn(image)``; the record is dropped unread."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, sample):
        _key, image, _record = sample
        return self.fn(image)


def to_tensor(image: np.ndarray) -> Tensor:
    """HxWx3 uint8 -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(image[..., :3], dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def random_box(rng: np.random.Generator, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """A random box (x0, y0, x1, y1) in the image's normalised coordinates [-1, 1] with area fraction in ``scale``."""
    for _ in range(10):
        area = rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= 1 and h <= 1:
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            return 2 * x0 - 1, 2 * y0 - 1, 2 * (x0 + w) - 1, 2 * (y0 + h) - 1
    side = math.sqrt(min(1.0, max(scale)))
    x0 = y0 = (1 - side) / 2
    return 2 * x0 - 1, 2 * y0 - 1, 2 * (x0 + side) - 1, 2 * (y0 + side) - 1


def crop(image: Tensor, box, flip: bool, size: int, mode: str = "bilinear") -> Tensor:
    """``image`` [C, H, W] resampled to [C, size, size] from ``box`` (normalised coordinates), mirrored if ``flip``
    (``mode="nearest"`` for label maps)."""
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / 2, (y1 - y0) / 2
    theta = torch.tensor([[[-sx if flip else sx, 0.0, (x0 + x1) / 2], [0.0, sy, (y0 + y1) / 2]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, image.shape[0], size, size], align_corners=False)
    return F.grid_sample(image[None], grid, mode=mode, padding_mode="border", align_corners=False)[0]


def to_view(points: np.ndarray, box, flip: bool) -> np.ndarray:
    """Image-normalised points [..., 2] (x, y) -> the same points in a view's normalised coordinates."""
    x0, y0, x1, y1 = box
    out = np.empty_like(points)
    out[..., 0] = (points[..., 0] - (x0 + x1) / 2) / ((x1 - x0) / 2)
    out[..., 1] = (points[..., 1] - (y0 + y1) / 2) / ((y1 - y0) / 2)
    if flip:
        out[..., 0] = -out[..., 0]
    return out


def overlap_grids(box_a, flip_a: bool, box_b, flip_b: bool, size: int) -> tuple[np.ndarray, bool]:
    """An ``size x size`` grid over the overlap of two views, in each view's coordinates ([2, S, S, 2]); False when
    the views do not overlap (the grids are then zeros)."""
    ix0, iy0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    ix1, iy1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if ix1 <= ix0 or iy1 <= iy0:
        return np.zeros((2, size, size, 2), np.float32), False
    t = (np.arange(size) + 0.5) / size
    xs, ys = ix0 + t * (ix1 - ix0), iy0 + t * (iy1 - iy0)
    pts = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).astype(np.float32)  # [S, S, 2], rows = y
    return np.stack([to_view(pts, box_a, flip_a), to_view(pts, box_b, flip_b)]).astype(np.float32), True


def jitter(x: Tensor, rng: np.random.Generator, strength: float) -> Tensor:
    """Random brightness and contrast, each by a factor in [1 - strength, 1 + strength]."""
    if strength <= 0:
        return x
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    return (x * rng.uniform(1 - strength, 1 + strength)).clamp_(0.0, 1.0)


class MultiCrop:
    """Two global views (with their overlap grids) and ``local_count`` local views of one image."""

    def __init__(self, global_size: int, global_scale: tuple[float, float], local_size: int, local_count: int,
                 local_scale: tuple[float, float], grid_size: int, flip_prob: float = 0.5, jitter: float = 0.2):
        self.global_size, self.global_scale = global_size, tuple(global_scale)
        self.local_size, self.local_count, self.local_scale = local_size, local_count, tuple(local_scale)
        self.grid_size, self.flip_prob, self.jitter = grid_size, flip_prob, jitter

    def __call__(self, image: np.ndarray) -> dict[str, Tensor]:
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))  # seeded by the engine's per-rank seed
        x = to_tensor(image)
        boxes = [random_box(rng, self.global_scale) for _ in range(2)]
        flips = [bool(rng.random() < self.flip_prob) for _ in range(2)]
        views = torch.stack([jitter(crop(x, b, f, self.global_size), rng, self.jitter) for b, f in zip(boxes, flips)])
        grids, valid = overlap_grids(boxes[0], flips[0], boxes[1], flips[1], self.grid_size)
        local = [jitter(crop(x, random_box(rng, self.local_scale), bool(rng.random() < self.flip_prob), self.local_size),
                        rng, self.jitter) for _ in range(self.local_count)]
        out = {"globals": views, "grids": torch.from_numpy(grids), "valid": torch.tensor(valid)}
        if local:
            out["locals"] = torch.stack(local)
        return out


def collate_views(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batch views view-major: ``globals`` [2B, ...] (view 0 of every image, then view 1), ``locals`` [LB, ...],
    ``grids`` [2, B, S, S, 2], ``valid`` [B]."""
    out = {"globals": torch.stack([it["globals"] for it in items], 1).flatten(0, 1),
           "grids": torch.stack([it["grids"] for it in items], 1),
           "valid": torch.stack([it["valid"] for it in items])}
    if "locals" in items[0]:
        out["locals"] = torch.stack([it["locals"] for it in items], 1).flatten(0, 1)
    return out
