"""The SegmenterConfig of each trained model of PartDistillation, from its stage's params.

- the instance teacher E + D^o (sec. 4.1): ``params.model`` (its default lives in the stage definition), with
  ``decoder.num_classes`` from the data;
- the part decoder D^p (sec. 4.2): ``params.model`` without an encoder, on the teacher's encoder (frozen), one class;
- the part ranker (sec. 4.3): the part model's config <- ``params.model``, one label per (object class, cluster).
"""
from __future__ import annotations

from typing import Any

from contract.io import deep_merge
from trainers.inputs import StageInputError
from trainers.models.config import EncoderConfig, SegmenterConfig


def teacher_config(model: dict[str, Any], num_classes: int) -> SegmenterConfig:
    """The teacher's SegmenterConfig: ``model`` (the stage's params.model) with num_classes from the data."""
    return SegmenterConfig.model_validate(deep_merge(model, {"decoder": {"num_classes": num_classes}}))


def part_config(model: dict[str, Any], encoder_cfg: EncoderConfig) -> SegmenterConfig:
    """D^p's SegmenterConfig: ``model`` (decoder, loss, top_k), the teacher's encoder (frozen), one class."""
    if "encoder" in model:
        raise StageInputError("params.model.encoder: the part model's encoder is the teacher's; set it on instance-teacher")
    cfg = deep_merge(model, {"decoder": {"num_classes": 1}, "freeze_encoder": True})
    return SegmenterConfig.model_validate({**cfg, "encoder": encoder_cfg.model_dump()})


def ranker_config(parts_cfg: SegmenterConfig, num_labels: int, overrides: dict[str, Any]) -> SegmenterConfig:
    """The ranker's SegmenterConfig: the part model's (encoder frozen) <- ``overrides``, ``num_labels`` classes."""
    if "encoder" in overrides:
        raise StageInputError("params.model.encoder: the ranker's encoder is the part model's")
    base = parts_cfg.model_dump(mode="json")
    base.pop("encoder")
    cfg = deep_merge(deep_merge(base, overrides), {"decoder": {"num_classes": max(1, num_labels)}, "freeze_encoder": True})
    return SegmenterConfig.model_validate({**cfg, "encoder": parts_cfg.encoder.model_dump()})
