"""``rank-parts``: part proposals assigned to objects and clustered per object class (PartDistillation sec. 4.3)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class RankPartsParams(InputSizeParams):
    """Candidates (eq. 1, score and area), per-class k-means and eq. 2 scores (sec. 4.3)."""

    k: int = Field(default=8, ge=1, description="Clusters per object class ('for association we set k=8', sec. 5).")
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Candidates have part score s_i^p > this.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Candidates win at least this fraction of their object's pixels (sec. 4.3: 5%).")
    objects: Literal["gt", "detected"] = Field(default="gt", description="gt: the records' objects and classes (instance labels); detected: the instance teacher's detections and classes (the paper's, ImageNet-21K has no masks).")
    object_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (objects: detected).")
    max_detections: int = Field(default=20, ge=1, description="Instance-teacher predictions considered per image.")
    niter: int = Field(default=20, ge=1, description="k-means iterations.")
    seed: int = Field(default=0, description="k-means seed.")
    max_points_per_centroid: int = Field(default=256, ge=1, description="k-means trains on at most this many candidates per cluster (then assigns all).")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="faiss k-means on GPU: auto when one is visible.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")


DEFINITION = StageDefinition(
    name="rank-parts",
    summary="Part candidates per object (eq. 1), k-means of their query features per object class (k=8) and eq. 2 density scores: cluster-id labels (PartDistillation sec. 4.3).",
    kind="label",
    params=RankPartsParams,
    entry="trainers.stages.rank_parts:run",
    datasets={"images": "Shards with object labels."},
    models={"parts": "The class-agnostic part model (its teacher alias): masks, scores and query features.",
            "instance_teacher": "The instance teacher (objects: detected)."},
    optional=frozenset({"instance_teacher"}),
    output_dataset=True,
)
