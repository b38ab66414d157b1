"""``cluster-pixels``: per-class k-means of pixel features, the one-stage baseline's labels (PartDistillation sec. 5, baseline (2))."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class ClusterPixelsParams(InputSizeParams):
    """Dataset-level k-means of mine-parts' pixel features per object class (sec. 5; k as rank-parts)."""

    k: int = Field(default=8, ge=1, description="Clusters per object class (the paper's k=8).")
    pixels_per_instance: int = Field(default=64, ge=1, description="Pixels of each instance spilled for k-means (seeded per instance).")
    niter: int = Field(default=20, ge=1, description="k-means iterations.")
    max_points_per_centroid: int = Field(default=256, ge=1, description="faiss trains on at most k x this many pixels per class.")
    objects: Literal["detected", "gt"] = Field(default="detected", description="Instances: the teacher's detections (class = its predicted class) or the records' objects.")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (objects: detected).")
    max_detections: int = Field(default=20, ge=1, description="Teacher predictions considered per image.")
    object_nms_iou: float | None = Field(default=None, gt=0, le=1, description="objects detected: a detection whose mask overlaps a better-scored one with IoU above this is dropped, whatever its class (the teacher's duplicates; as evaluate-parts' param of that name); None: every detection above score_threshold.")
    min_object_area: float = Field(default=0.01, ge=0, le=1, description="Instances smaller than this fraction of the image are skipped.")
    min_part_area: float = Field(default=0.0, ge=0, le=1, description="Clusters of an instance smaller than this fraction of it are dropped.")
    feature_levels: tuple[int, ...] = Field(default=(0, 1), min_length=1, description="Indices into Segmenter.pixel_features (as mine-parts: mask features + stride 8).")
    batch_size: int = Field(default=8, ge=1, description="Images per forward pass.")
    seed: int = Field(default=0, description="Pixel sampling and k-means seed.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="faiss k-means on GPU: auto when one is visible.")
    allow_parts: bool = Field(default=False, description="Cluster an evaluation split (Table 2's 'K-means' row, measured by evaluate-parts); parts are never copied.")


DEFINITION = StageDefinition(
    name="cluster-pixels",
    summary="Per object class, k-means (k=8) over the pixel features of all its instances; every instance pixel takes its nearest centroid (PartDistillation sec. 5, one-stage baseline and Table 2 'K-means').",
    kind="label",
    params=ClusterPixelsParams,
    entry="trainers.stages.cluster_pixels:run",
    datasets={"images": "Shards with object labels (an eval split with allow_parts).",
              "centroids": "A cluster-pixels dataset whose fit (clusters/, label_map.json) labels the images instead of a new k-means (e.g. the train split's fit applied to the eval split)."},
    optional=frozenset({"centroids"}),
    models={"teacher": "The instance teacher: its pixel features, and its detections unless objects: gt."},
    output_dataset=True,
)
