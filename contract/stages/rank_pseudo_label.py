"""``rank-pseudo-label``: the next final-self-training round's labels from the part ranker (PartDistillation sec. 4.3)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class RankPseudoLabelParams(InputSizeParams):
    """rank-parts' postprocessing on the ranker's class-conditioned predictions (sec. 4.3: 'the same ... area and score thresholds')."""

    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Parts kept with class-conditioned score > this.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Parts win at least this fraction of their object's pixels.")
    objects: Literal["gt", "detected"] = Field(default="gt", description="gt: the records' objects and classes; detected: the instance teacher's.")
    object_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (objects: detected).")
    max_detections: int = Field(default=20, ge=1, description="Instance-teacher predictions considered per image.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")


DEFINITION = StageDefinition(
    name="rank-pseudo-label",
    summary="The part ranker's class-conditioned parts, filtered like rank-parts' candidates: the next round's cluster-id labels (PartDistillation sec. 4.3).",
    kind="label",
    params=RankPseudoLabelParams,
    entry="trainers.stages.rank_pseudo_label:run",
    datasets={"images": "Shards with object labels."},
    models={"ranker": "The train-ranker model (its teacher alias), with its label map.",
            "instance_teacher": "The instance teacher (objects: detected)."},
    optional=frozenset({"instance_teacher"}),
    output_dataset=True,
)
