"""Batches of a dataset for inference and training: image tensors, set-prediction targets, augmentation.

One implementation each: every stage that runs a model over shards, and every trainer that feeds the
engine, reads images and records through these.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

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


def category_labels(dataset_dir: str) -> dict[int, int]:
    """Object category id -> class index 0..C-1 in the order of the dataset's ``categories``."""
    return {int(c["id"]): i for i, c in enumerate(shards.DatasetIndex.load(dataset_dir).categories)}


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

    ``targets`` is :func:`proposal_targets` or ``functools.partial(object_targets, labels=...)``.
    """

    def __init__(self, targets, flip_prob: float = 0.5):
        self.targets, self.flip_prob = targets, flip_prob

    def __call__(self, sample):
        _, image, record = sample
        target = self.targets(record)
        if self.flip_prob > 0 and np.random.random() < self.flip_prob:
            image, target = hflip(image, target)
        return images_to_tensor([image])[0], target


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
