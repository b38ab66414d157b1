"""Stage ``finetune-segmentation``: PASS's fine-tuning step (LUSS sec. 4.4) on the generated pixel labels.

The backbone of ``inputs.models.representation`` plus a 1x1 conv with K+1 channels (K generated categories and
'other', K read from the labels' ``label_rule.json``) is trained through the engine (DeepSpeed, ZeRO from the spec)
by pixel-wise cross-entropy of the logits, upsampled to the crop, against the labels of ``inputs.datasets.train``
on random resized crops with flips. ``targets: generated`` reads only the generated labels (``proposals``): a
record carrying ground-truth objects is an error, so a labelled split cannot slip in. ``targets: ground_truth``
paints a labelled split's objects as categories (0 'other'): the semi-supervised protocol (sec. 3.2.1).

Writes ``<workdir>/model.pt`` in the representation file format with ``extra.segmentation_head`` and
``extra.num_classes``: the evaluation predicts with it (eq. 8) and any pipeline can reuse its backbone.
Params: ``python -m trainers finetune-segmentation --help``.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier
from trainers.data import shards
from trainers.data.imagenet_s import IGNORE_LABEL, class_indices, semantic_map
from trainers.engine import fit
from trainers.inputs import StageInputError, dataset_input, model_input_path
from trainers.luss.labels import LabelRule, proposals_to_labels
from trainers.luss.model import (
    RepresentationFileError,
    SegmentationModel,
    output_stride_of,
    read_model_file,
    save_model_file,
    sub_state,
)
from trainers.luss.multicrop import crop, random_box, to_tensor
from trainers.stages import StageResult


class SegmentationSample:
    """Engine transform: (key, image, record) -> (image crop [3, s, s], label crop [s, s] int64; -1 ignored)."""

    def __init__(self, targets: str, classes: dict[int, int], size: int, scale: tuple[float, float], flip_prob: float):
        self.targets, self.classes, self.size, self.scale, self.flip_prob = targets, classes, size, tuple(scale), flip_prob

    def labels(self, key: str, record: dict) -> np.ndarray:
        if self.targets == "generated":
            if record.get("objects"):
                raise ValueError(f"sample {key}: ground-truth objects in a generated-labels dataset (targets: generated "
                                 "reads generated labels only)")
            return proposals_to_labels(record)
        return semantic_map(record, self.classes)

    def __call__(self, sample):
        key, image, record = sample
        labels = torch.from_numpy(self.labels(key, record).astype(np.float32))[None]
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        box, flip = random_box(rng, self.scale), bool(rng.random() < self.flip_prob)
        return crop(to_tensor(image), box, flip, self.size), crop(labels, box, flip, self.size, mode="nearest")[0].long()


def collate(items):
    images, labels = zip(*items)
    return torch.stack(images), torch.stack(labels)


def segmentation_loss(engine, batch):
    """Cross-entropy of the logits upsampled to the crop (ignored pixels left out) and the pixel accuracy."""
    images, labels = batch
    logits = F.interpolate(engine(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
    valid = labels != IGNORE_LABEL
    acc = (logits.argmax(1)[valid] == labels[valid]).float().mean() if bool(valid.any()) else logits.new_zeros(())
    return loss, {"pixel_accuracy": float(acc)}


def initialised(doc: dict, num_classes: int) -> SegmentationModel:
    model = SegmentationModel(doc["timm_name"], output_stride_of(doc), num_classes)
    model.backbone.net.load_state_dict(doc["state_dict"])
    return model


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    t0 = time.perf_counter()
    train = dataset_input(spec, "train")
    try:
        doc = read_model_file(model_input_path(spec, "representation"))
    except RepresentationFileError as e:
        raise StageInputError(f"inputs.models.representation: {e}") from e
    categories = shards.DatasetIndex.load(train).categories
    if p.targets == "generated":
        try:
            rule, _ = LabelRule.load(train)
        except ValueError as e:
            raise StageInputError(f"inputs.datasets.train: {e}") from e
        num_classes, extra = rule.k + 1, {"rule": {"method": rule.method, "k": rule.k}}
    else:
        num_classes, extra = len(categories) + 1, {"categories": categories}
    transform = SegmentationSample(p.targets, class_indices(categories), p.crop_size, p.crop_scale, p.flip_prob)
    result = fit(spec, p, build_model=functools.partial(initialised, doc, num_classes), loss_fn=segmentation_loss,
                 transform=transform, collate=collate)
    model_path = Path(spec.outputs.workdir) / "model.pt"
    if result.dist.is_main:
        state = result.state_dict
        save_model_file(model_path, doc["timm_name"], sub_state(state, "backbone.net"), stage="finetune-segmentation",
                        output_stride=output_stride_of(doc), extra={"num_classes": num_classes,
                               "segmentation_head": sub_state(state, "head"), "targets": p.targets,
                               "representation": str(spec.inputs.models["representation"].uri), **extra})
    barrier()
    if not result.dist.is_main:
        return None
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k in ("loss", "pixel_accuracy")}
    metrics["time/train_s"] = time.perf_counter() - t0
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
