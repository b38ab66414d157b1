"""``evaluate-parts``: class-specific part segmentation against held-out part masks (PartDistillation sec. 5.1, Tables 2-3)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class EvaluatePartsParams(InputSizeParams):
    """Settings reported and the objects of the 'pred' setting (sec. 5.1, Table 3 'GT Object')."""

    settings: tuple[Literal["gt", "pred"], ...] = Field(default=("gt", "pred"), min_length=1, description="gt: with ground-truth object masks and classes; pred: with the instance teacher's detections (Table 3).")
    max_dets: tuple[int, ...] = Field(default=(1, 10, 50, 100, 200), min_length=1, description="The k of the class-agnostic AR@k of the part masks.")
    object_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (setting pred).")
    max_detections: int = Field(default=20, ge=1, description="Instance-teacher predictions considered per image (setting pred).")
    object_nms_iou: float | None = Field(default=None, gt=0, le=1, description="Setting pred: a detection whose mask overlaps a better-scored one with IoU above this is dropped, whatever its class (the teacher's duplicates); None: every detection above object_score_threshold.")
    pixel_assignment: Literal["mask", "soft"] = Field(default="soft", description="A model's cluster map: each object pixel goes to argmax_i M_i(x) s_i over the object's parts (eq. 1 assignment), M_i the binary mask (mask: pixels no part covers stay unassigned) or the mask probability (soft: Mask2Former's semantic inference within the object, every pixel of an object with parts assigned, as a labels dataset's k-means clusters are: the default, so a model and the k-means baseline are scored alike).")
    batch_size: int = Field(default=8, ge=1, description="Images per inference batch.")
    reference: Literal["parts", "pseudo_labels"] = Field(default="parts", description="The ground truth: the eval dataset's part masks, or its proposals' cluster ids (a pseudo-labeller's clusters on held-out images without part labels: the label-free selection criterion; a dataset with part labels is refused).")


DEFINITION = StageDefinition(
    name="evaluate-parts",
    summary="NMI/ARI/mIoU of part cluster ids and AR@k of part masks, with GT or detected objects (PartDistillation sec. 5.1, Tables 2-3); exactly one source of predictions; the predictions written as COCO results files.",
    kind="evaluate",
    params=EvaluatePartsParams,
    entry="trainers.stages.evaluate_parts:run",
    datasets={"eval": "An evaluation split with part masks (the ground truth), or with reference: pseudo_labels a labelled dataset of held-out images without them.",
              "labels": "A labels dataset on the eval images (rank-parts / cluster-pixels records), matched by key."},
    models={"candidate": "A train-ranker model run on the eval images, conditioned on the objects.",
            "ranker": "The same, under its stage's name.",
            "instance_teacher": "The detector of the pred setting (needed with a model and settings including pred)."},
    optional=frozenset({"labels", "candidate", "ranker", "instance_teacher"}),
    output_dataset=True,
)
