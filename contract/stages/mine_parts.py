"""``mine-parts``: class-agnostic part proposals by k-means inside object instances (PartDistillation sec. 4.2)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class MinePartsParams(InputSizeParams):
    """Part mining (PartDistillation sec. 4.2; defaults are the paper's setting)."""

    k: int = Field(default=4, ge=1, description="Clusters (part proposals) per instance (Fig. 6 left: k=4).")
    metric: Literal["cosine", "l2"] = Field(default="cosine", description="k-means distance (Table 6: cosine).")
    feature_levels: tuple[int, ...] = Field(default=(0, 1), min_length=1, description="Indices into Segmenter.pixel_features: 0 = mask features (stride 4), 1 = stride 8, ...")
    max_points: int = Field(default=1024, ge=1, description="Grid points per instance k-means is fitted on (seeded subsample); every pixel is assigned.")
    iters: int = Field(default=20, ge=1, description="Lloyd iterations.")
    objects: Literal["detected", "gt"] = Field(default="detected", description="Instances to mine: the teacher's detections (sec. 4.2) or the records' objects (sec. 5.5).")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (objects: detected).")
    max_detections: int = Field(default=20, ge=1, description="Teacher predictions considered per image.")
    min_object_area: float = Field(default=0.01, ge=0, le=1, description="Instances smaller than this fraction of the image are skipped.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Proposals smaller than this fraction of their instance are dropped.")
    refine: bool = Field(default=False, description="Colour-affinity mean-field smoothing of the assignment (CRF-like).")
    refine_iters: int = Field(default=5, ge=1, description="Mean-field iterations of the refinement.")
    batch_size: int = Field(default=8, ge=1, description="Images per forward pass and per batched k-means call.")
    seed: int = Field(default=0, description="k-means++ seeding and point subsampling (per instance, derived from the image key).")
    allow_parts: bool = Field(default=False, description="Read an evaluation split (to measure mined-proposal quality); part labels are never copied.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")


DEFINITION = StageDefinition(
    name="mine-parts",
    summary="Part proposals by k-means (k=4, cosine) over multi-scale pixel features inside each instance (PartDistillation sec. 4.2).",
    kind="label",
    params=MinePartsParams,
    entry="trainers.stages.mine_parts:run",
    datasets={"images": "Shards to mine (object labels; part masks only with allow_parts)."},
    models={"teacher": "The instance teacher (segmenter): its pixel features are clustered, its detections are the instances unless objects: gt."},
    output_dataset=True,
)
