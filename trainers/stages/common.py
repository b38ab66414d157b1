"""Helpers shared by the PartDistillation stages: spec inputs, image batches, targets, augmentation.

Small on purpose (one implementation each; STYLE.md): the stages ``instance-teacher``,
``train-proposals``, ``pseudo-label``, ``mine-parts`` and ``evaluate-proposals`` all read models
and shards through these.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from contract.spec import StageSpec
from trainers.data import shards
from trainers.structures import decode_mask

# -- spec inputs ------------------------------------------------------------------------------


class StageInputError(ValueError):
    """A stage input named in the spec is missing or unreadable; the message names the input."""


def stage_device(spec: StageSpec) -> torch.device:
    """cuda:<LOCAL_RANK> when the spec asks for GPUs and one is visible, else cpu."""
    if spec.resources.gpus_per_replica > 0 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def dataset_input(spec: StageSpec, name: str) -> str:
    """Path of ``spec.inputs.datasets[name]``; StageInputError when it is not in the spec or not a published dataset."""
    ref = spec.inputs.datasets.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.datasets.{name} "
                              f"(the spec has: {sorted(spec.inputs.datasets) or 'none'})")
    try:
        shards.DatasetIndex.load(ref.path)
    except shards.DataError as e:
        raise StageInputError(f"inputs.datasets.{name}: {e}") from None
    return ref.path


def model_input_path(spec: StageSpec, name: str) -> Path:
    """Local file of ``spec.inputs.models[name]`` (a ``models:/`` URI is resolved through MLflow)."""
    from contract.models import resolve_model

    ref = spec.inputs.models.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.models.{name} "
                              f"(the spec has: {sorted(spec.inputs.models) or 'none'})")
    try:
        return Path(resolve_model(ref.uri, spec.tracking.mlflow_uri))
    except Exception as e:  # FileNotFoundError, MLflow lookup errors
        raise StageInputError(f"inputs.models.{name} ({ref.uri}): {e}") from e


def load_model_input(spec: StageSpec, name: str, device: torch.device | None = None):
    """The Segmenter of ``spec.inputs.models[name]`` (a segmenter file, see ``trainers.models.io``), in eval mode on ``device``."""
    from trainers.models.io import load_segmenter

    path = model_input_path(spec, name)
    try:
        model = load_segmenter(path)
    except (FileNotFoundError, ValueError) as e:
        raise StageInputError(f"inputs.models.{name}: {e}") from e
    return model.to(device or stage_device(spec)).eval()


def log_metrics(spec: StageSpec, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics to the stage's MLflow run (when the spec names one); call on rank 0 only (non-training stages)."""
    if spec.tracking.run_id is None or not metrics:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient(tracking_uri=spec.tracking.mlflow_uri).log_batch(
        spec.tracking.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# -- images and targets -----------------------------------------------------------------------


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


def _masks(rles: list[dict], height: int, width: int) -> Tensor:
    if not rles:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.from_numpy(np.stack([decode_mask(r) for r in rles]))


def object_targets(record: dict, labels: dict[int, int]) -> dict[str, Tensor]:
    """SetCriterion targets from a record's objects: ``labels`` [M] (class index via ``labels``), ``masks`` bool [M, H, W]."""
    objects = record.get("objects", [])
    h, w = int(record["height"]), int(record["width"])
    return {"labels": torch.tensor([labels[int(o["category_id"])] for o in objects], dtype=torch.int64),
            "masks": _masks([o["segmentation"] for o in objects], h, w)}


def proposal_targets(record: dict) -> dict[str, Tensor]:
    """Class-agnostic part targets (PartDistillation sec. 4.2): every proposal of the image, label 0."""
    proposals = record.get("proposals", [])
    h, w = int(record["height"]), int(record["width"])
    return {"labels": torch.zeros(len(proposals), dtype=torch.int64),
            "masks": _masks([p["segmentation"] for p in proposals], h, w)}


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


def set_loss(engine, batch) -> tuple[Tensor, dict[str, float]]:
    """Engine loss_fn for a Segmenter: SetCriterion total plus its last-layer terms as metrics."""
    images, targets = batch
    dtype = next(p for p in engine.module.parameters()).dtype
    outputs = engine(images.to(dtype))
    losses = engine.module.loss(outputs, targets)
    return losses["loss"], {k: float(losses[k].detach()) for k in ("loss_ce", "loss_mask", "loss_dice")}


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
