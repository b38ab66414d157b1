"""Batches of a dataset for inference and training: image tensors, set-prediction targets, augmentation.

One implementation each: every stage that runs a model over shards, and every trainer that feeds the
engine, reads images and records through these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.data import shards
from trainers.structures import decode_mask


def images_to_tensor(images: list[np.ndarray]) -> Tensor:
    """HxWx3 uint8 images -> float [B, 3, H, W] in [0, 1]; smaller images are zero-padded bottom/right to the largest."""
    if not images:
        raise ValueError("images_to_tensor needs at least one image")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    out = torch.zeros(len(images), 3, h, w, dtype=torch.float32)
    for i, im in enumerate(images):
        t = torch.from_numpy(np.array(im[..., :3])).permute(2, 0, 1).float().div_(255.0)
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out


@dataclass(frozen=True)
class InputSize:
    """The size images enter the models at (``contract.stages.input_size.InputSizeParams``; detectron2's
    ResizeShortestEdge): the shortest edge resized to ``min_size`` unless the longest would then exceed ``max_size``.
    Both None (false): images as stored. The one place the resize happens: the training transforms
    (:class:`ToTrainSample`, :class:`StrongAugment`) and the inference wrapper (:func:`at_input_size`) use it."""

    min_size: int | None = None
    max_size: int | None = None

    @classmethod
    def of(cls, params) -> "InputSize":
        """The input size of a stage's params (their ``min_size`` and ``max_size``)."""
        return cls(params.min_size, params.max_size)

    def __bool__(self) -> bool:
        return self.min_size is not None or self.max_size is not None

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of that size is resized to (detectron2's ``ResizeShortestEdge.get_output_shape``)."""
        scale = 1.0 if self.min_size is None else self.min_size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def images(self, images: Tensor) -> Tensor:
        """Images ``[..., 3, H, W]`` (uint8 [0, 255] or float [0, 1]) at the input size, float [0, 1] (bilinear,
        antialiased when shrinking, as PIL's resize)."""
        size = self.shape(*images.shape[-2:])
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if size == tuple(images.shape[-2:]):
            return images
        flat = images.reshape(-1, *images.shape[-3:])
        out = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.clamp_(0.0, 1.0).reshape(*images.shape[:-2], *size)

    def masks(self, masks: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """bool masks ``[M, H, W]`` at ``size`` (default: the input size of an H x W image), nearest neighbour."""
        size = size or self.shape(*masks.shape[-2:])
        if size == tuple(masks.shape[-2:]):
            return masks
        if masks.shape[0] == 0:
            return masks.new_zeros((0, *size))
        return F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5


class AtInputSize(nn.Module):
    """A Segmenter that sees every image at an :class:`InputSize` and answers at the size of the images it was given:
    ``predict`` upsamples the mask logits to that size (bilinear, as ``postprocess`` does), so masks, metrics and
    written predictions stay at the dataset's resolution. ``forward`` returns the decoder outputs of the resized images
    (mask logits at stride 4 of the input size: callers interpolate them to their object masks' size, as
    ``trainers.parts.ranking`` does); ``pixel_features`` the resized images' features (mining samples them at
    normalised pixel centres, so they serve the stored resolution)."""

    def __init__(self, model: nn.Module, size: InputSize):
        super().__init__()
        self.model, self.size, self.cfg = model, size, model.cfg

    def forward(self, images: Tensor) -> dict:
        return self.model(self.size.images(images))

    def pixel_features(self, images: Tensor) -> list[Tensor]:
        return self.model.pixel_features(self.size.images(images))

    @torch.no_grad()
    def predict(self, images: Tensor, top_k: int | None = None):
        from trainers.models.segmenter import postprocess

        return postprocess(self(images), tuple(images.shape[-2:]), top_k or self.cfg.top_k)


def at_input_size(model, params):
    """``model`` run at the input size of a stage's ``params`` (:class:`AtInputSize`), or ``model`` itself when the
    params keep the images as stored (or ``model`` is None)."""
    size = InputSize.of(params)
    return AtInputSize(model, size) if size and model is not None else model


def category_labels(dataset_dir: str) -> dict[int, int]:
    """Object category id -> class index 0..C-1 in the order of the dataset's ``categories`` (things only: stuff
    categories, ``isthing`` 0, label the records' ``stuff``, never an object; see trainers.data.panoptic)."""
    cats = shards.DatasetIndex.load(dataset_dir).categories
    return {int(c["id"]): i for i, c in enumerate(c for c in cats if int(c.get("isthing", 1)))}


def masks_tensor(rles: list[dict], height: int, width: int) -> Tensor:
    """RLEs -> bool [N, H, W] (N may be 0)."""
    if not rles:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.from_numpy(np.stack([decode_mask(r) for r in rles]))


def object_targets(record: dict, labels: dict[int, int]) -> dict[str, Tensor]:
    """SetCriterion targets from a record's objects: ``labels`` [M] (class index via ``labels``), ``masks`` bool [M, H, W]."""
    objects = record.get("objects", [])
    h, w = int(record["height"]), int(record["width"])
    return {"labels": torch.tensor([labels[int(o["category_id"])] for o in objects], dtype=torch.int64),
            "masks": masks_tensor([o["segmentation"] for o in objects], h, w)}


def proposal_targets(record: dict) -> dict[str, Tensor]:
    """Class-agnostic part targets (PartDistillation sec. 4.2): every proposal of the image, label 0."""
    proposals = record.get("proposals", [])
    h, w = int(record["height"]), int(record["width"])
    return {"labels": torch.zeros(len(proposals), dtype=torch.int64),
            "masks": masks_tensor([p["segmentation"] for p in proposals], h, w)}


def hflip(image: np.ndarray, target: dict[str, Tensor]) -> tuple[np.ndarray, dict[str, Tensor]]:
    """Mirror an image and its target masks left-right."""
    return np.ascontiguousarray(image[:, ::-1]), {**target, "masks": target["masks"].flip(-1)}


class ToTrainSample:
    """Engine transform: (key, image, record) -> (3xHxW float image in [0, 1], target), with a random horizontal flip.

    ``targets`` is :func:`proposal_targets` or ``functools.partial(object_targets, labels=...)``; image and target
    masks are resized to ``size`` (:class:`InputSize`; default: as stored).
    """

    def __init__(self, targets, flip_prob: float = 0.5, size: InputSize = InputSize()):
        self.targets, self.flip_prob, self.size = targets, flip_prob, size

    def __call__(self, sample):
        _, image, record = sample
        target = self.targets(record)
        if self.flip_prob > 0 and np.random.random() < self.flip_prob:
            image, target = hflip(image, target)
        image = images_to_tensor([image])[0]
        if self.size:
            image, target = self.size.images(image), {**target, "masks": self.size.masks(target["masks"])}
        return image, target


def resized_crop(image: Tensor, masks: Tensor, top: int, left: int, height: int, width: int,
                 size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Crop ``image [3, H, W]`` and ``masks [M, H, W]`` to the box, then resize both to ``size`` (default: back to
    H x W; bilinear, masks nearest): scale jitter that keeps the batch's image size."""
    h, w = size or image.shape[-2:]
    img = F.interpolate(image[None, :, top:top + height, left:left + width], size=(h, w), mode="bilinear",
                        align_corners=False, antialias=h < height or w < width)[0]
    if masks.shape[0] == 0:
        return img, masks.new_zeros((0, h, w))
    m = F.interpolate(masks[:, top:top + height, left:left + width][None].float(), size=(h, w), mode="nearest")[0]
    return img, m > 0.5


def color_jitter(image: Tensor, rng: np.random.Generator, brightness: float, contrast: float, saturation: float) -> Tensor:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], applied in a random order (as torchvision's
    ColorJitter), on a float [3, H, W] image in [0, 1]."""
    gray = lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # noqa: E731
    ops = []
    if brightness > 0:
        f = rng.uniform(1 - brightness, 1 + brightness)
        ops.append(lambda x: x * f)
    if contrast > 0:
        c = rng.uniform(1 - contrast, 1 + contrast)
        ops.append(lambda x: (x - gray(x).mean()) * c + gray(x).mean())
    if saturation > 0:
        s_ = rng.uniform(1 - saturation, 1 + saturation)
        ops.append(lambda x: (x - gray(x)) * s_ + gray(x))
    for i in rng.permutation(len(ops)):
        image = ops[i](image).clamp_(0.0, 1.0)
    return image


class StrongAugment:
    """Engine transform of the self-training student (PartDistillation sec. 2: "heavily augmenting the students
    inputs"): random horizontal flip, random resized crop (scale jitter: a box of ``scale`` of the image area and
    aspect ratio in ``ratio``, resized back to the image size) and colour jitter. The targets are the teacher's labels,
    made on the un-augmented image, transformed with it; a target the crop leaves empty is dropped.
    ``targets`` as :class:`ToTrainSample`'s; the crop is resized to the input size ``size`` of the whole image
    (:class:`InputSize`; default: the image's own size). Randomness from numpy's global generator (seeded per rank by
    the engine)."""

    def __init__(self, targets, flip_prob: float = 0.5, scale: tuple[float, float] = (0.3, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, size: InputSize = InputSize()):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.targets, self.flip_prob, self.scale, self.ratio, self.size = targets, flip_prob, scale, ratio, size
        self.jitter = (brightness, contrast, saturation)

    def box(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop (torchvision's RandomResizedCrop sampling, 10 tries, then the
        whole image)."""
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        return 0, 0, h, w

    def __call__(self, sample):
        _, image, record = sample
        target = self.targets(record)
        rng = np.random.default_rng(np.random.randint(2**31))
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        img = images_to_tensor([image])[0]
        h, w = img.shape[-2:]
        img, masks = resized_crop(img, target["masks"], *self.box(rng, h, w), size=self.size.shape(h, w))
        keep = masks.flatten(1).any(1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
        target = {**{k: v[keep] for k, v in target.items() if k != "masks"}, "masks": masks[keep]}
        return color_jitter(img, rng, *self.jitter), target


def collate(items: list[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    images, targets = zip(*items)
    return torch.stack(images), list(targets)


def iter_batches(dataset_dir: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 allow_parts: bool = False, decode: bool = True) -> Iterator[tuple[list[str], list, list[dict]]]:
    """This rank's share of a dataset as (keys, images, records) lists of up to ``batch_size``.

    Images are HxWx3 uint8 arrays, or the stored PNG/JPEG bytes with ``decode=False``.
    """
    keys, images, records = [], [], []
    for key, image, record in shards.iter_samples(dataset_dir, rank=rank, world_size=world_size,
                                                  allow_parts=allow_parts, decode=decode):
        keys.append(key)
        images.append(image)
        records.append(record)
        if len(keys) == batch_size:
            yield keys, images, records
            keys, images, records = [], [], []
    if keys:
        yield keys, images, records


def same_size_groups(items: list[tuple]) -> list[list[tuple]]:
    """Split a batch of (key, image bytes, image, record) into runs of one image size (never padded)."""
    groups: dict[tuple[int, int], list[tuple]] = {}
    for it in items:
        groups.setdefault(it[2].shape[:2], []).append(it)
    return list(groups.values())


def iter_same_size(dataset_dir: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                   allow_parts: bool = False) -> Iterator[list[tuple]]:
    """This rank's samples as lists of same-size ``(key, image bytes, image, record)``: batches of ``batch_size``
    read in order, each split by image size (:func:`same_size_groups`)."""
    batch = []
    for key, raw, record in shards.iter_samples(dataset_dir, rank=rank, world_size=world_size, decode=False,
                                                allow_parts=allow_parts):
        batch.append((key, raw, shards.decode_image(raw, key=key), record))
        if len(batch) == batch_size:
            yield from same_size_groups(batch)
            batch = []
    if batch:
        yield from same_size_groups(batch)


def with_proposals(record: dict, proposals: list[dict]) -> dict:
    """An output record of a labelling stage: the input record without ``parts`` (never copied) and without its old
    ``proposals``, plus ``proposals``."""
    out = {k: v for k, v in record.items() if k not in ("parts", "proposals")}
    out["proposals"] = proposals
    return out
