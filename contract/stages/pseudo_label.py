"""``pseudo-label``: the next round's part proposals from the current part model (PartDistillation sec. 4.2 'Self-training')."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class PseudoLabelParams(InputSizeParams):
    """The self-training filters of sec. 4.2 ("we filter out part proposals that do not overlap with the object instance mask or have low score")."""

    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Part predictions kept with score > this.")
    objects: Literal["detected", "gt"] = Field(default="detected", description="Instances: the instance teacher's detections (the paper's) or the records' objects.")
    object_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (objects: detected).")
    max_detections: int = Field(default=20, ge=1, description="Instance-teacher predictions considered per image.")
    min_overlap: float = Field(default=0.5, ge=0, le=1, description="Least fraction of a part inside the instance it overlaps most (eq. 1 assignment).")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Least clipped part area, as a fraction of its instance (sec. 4.3's 5%).")
    duplicate_iou: float = Field(default=0.7, ge=0, le=1, description="A part this similar (IoU >) to a better kept part of the same instance is dropped.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")
    allow_parts: bool = Field(default=False, description="Read an evaluation split (to measure the pseudo-labels' own quality, as the next round's targets); part labels are never copied.")


DEFINITION = StageDefinition(
    name="pseudo-label",
    summary="Part predictions filtered by score, instance overlap, area and duplicates, clipped to their instance: the next round's proposals (PartDistillation sec. 4.2).",
    kind="label",
    params=PseudoLabelParams,
    entry="trainers.stages.pseudo_label:run",
    datasets={"images": "Shards to pseudo-label (object labels; part masks only with allow_parts)."},
    models={"parts": "The part-proposal model (its teacher alias).",
            "instance_teacher": "The instance teacher whose detections are the instances (objects: detected)."},
    optional=frozenset({"instance_teacher"}),
    output_dataset=True,
)
