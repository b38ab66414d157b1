"""A small CNN learning object classes per pixel (stride-4 logits), with its data transform, loss and evaluation.

The model of the ``fit-objects`` stage, which exists to exercise the engine and the stage runtime end to end;
the PartDistillation models are the segmenters of ``trainers.models``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainers.comm import Dist
from trainers.data import shards
from trainers.structures import decode_mask

STRIDE = 4


class ObjectSegNet(nn.Module):
    """Per-pixel object classes (0 = background) at stride 4: two stride-2 convs, residual 3x3 blocks, 1x1 head."""

    def __init__(self, num_classes: int, width: int = 32, blocks: int = 2):
        super().__init__()

        def conv(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(conv(3, width, 2), conv(width, width, 2))
        self.blocks = nn.ModuleList(conv(width, width) for _ in range(blocks))
        self.head = nn.Conv2d(width, num_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def object_class_map(record: dict, height: int, width: int, labels: dict[int, int]) -> np.ndarray:
    """HxW int64 map: ``labels[category_id]`` under each object's mask (later objects on top), 0 elsewhere."""
    out = np.zeros((height, width), dtype=np.int64)
    for obj in record.get("objects", []):
        out[decode_mask(obj["segmentation"])] = labels[int(obj["category_id"])]
    return out


class ToTensors:
    """(key, image, record) -> (3xSxS float image, S/4 x S/4 class targets)."""

    MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, image_size: int, labels: dict[int, int]):
        self.size, self.labels = image_size, labels

    def __call__(self, sample):
        _, image, record = sample
        h, w = image.shape[:2]
        labels = object_class_map(record, h, w, self.labels)
        if (h, w) != (self.size, self.size):
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR))
            labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((self.size, self.size), Image.NEAREST))
        x = (image.astype(np.float32) / 255.0 - self.MEAN) / self.STD
        target = labels[STRIDE // 2::STRIDE, STRIDE // 2::STRIDE].astype(np.int64)  # cell centres
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(target.copy())


def collate(items):
    images, targets = zip(*items)
    return torch.stack(images), torch.stack(targets)


def loss_fn(engine, batch):
    images, targets = batch
    dtype = next(engine.module.parameters()).dtype
    logits = engine(images.to(dtype)).float()
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        acc = (logits.argmax(1) == targets).float().mean()
    return loss, {"pixel_accuracy": float(acc)}


def class_labels(dataset_dir: str) -> dict[int, int]:
    """Category id -> training label 1..C, in the order of the dataset's ``categories`` (0 is background)."""
    return {int(c["id"]): i + 1 for i, c in enumerate(shards.DatasetIndex.load(dataset_dir).categories)}


@torch.no_grad()
def evaluate(model: nn.Module, path: str, d: Dist, num_classes: int, transform: ToTensors,
             batch_size: int = 32) -> dict[str, float]:
    """Pixel accuracy, mIoU over object classes, object-vs-background IoU on this rank's share, summed over ranks."""
    model.eval()
    k = num_classes + 1
    confusion = torch.zeros(k, k, dtype=torch.int64)

    def flush(batch):
        images, targets = collate(batch)
        pred = model(images.to(d.device)).argmax(1).cpu()
        confusion.add_(torch.bincount(targets.flatten() * k + pred.flatten(), minlength=k * k).view(k, k))

    batch = []
    for sample in shards.iter_samples(path, rank=d.rank, world_size=d.world_size, allow_parts=True):
        batch.append(transform(sample))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if dist.is_initialized():
        dist.all_reduce(confusion)
    c = confusion.double()
    tp = c.diag()
    iou = tp / (c.sum(0) + c.sum(1) - tp)
    present = (c.sum(1) > 0)[1:]  # object classes that occur in the ground truth
    fg_tp = c[1:, 1:].sum()
    fg_iou = fg_tp / (c[1:, :].sum() + c[:, 1:].sum() - fg_tp)
    return {
        "eval/pixel_accuracy": float(tp.sum() / c.sum()),
        "eval/miou": float(iou[1:][present].mean()) if present.any() else 0.0,
        "eval/fg_iou": float(fg_iou),
        "eval/pixels": float(c.sum()),
    }
