"""``evaluate-segmentation``: the LUSS evaluation protocols and metrics (PASS sec. 3.2, supplementary 7.1)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import Params, StageDefinition


class EvaluateSegmentationParams(Params):
    """Protocol, metrics and inference batch."""

    protocol: Literal["fully_unsupervised", "distance_matching", "semi_supervised"] = Field(
        default="fully_unsupervised",
        description="fully_unsupervised: generated categories matched to ground truth by the Hungarian algorithm on the "
                    "image-level matching matrix, 'other' to 'other'; distance_matching: every pixel labelled by a top-k "
                    "vote of category embeddings from the labeled images; semi_supervised: a model trained on "
                    "ground-truth categories, scored as it is.")
    boundary_ratio: float = Field(default=0.02, gt=0, lt=1, description="Boundary IoU band width as a fraction of the image diagonal (2%).")
    top_k: int = Field(default=10, ge=1, description="distance_matching: embeddings voting for each pixel.")
    upsample: int = Field(default=4, ge=1, description="distance_matching: output features = the last stage upsampled this many times.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")


DEFINITION = StageDefinition(
    name="evaluate-segmentation",
    summary="mIoU, boundary mIoU, Img-Acc, F-beta and mIoU by object size of a LUSS model under the fully unsupervised, "
            "distance-matching or semi-supervised protocol; predictions written in ImageNet-S's PNG encoding (PASS sec. 3.2).",
    kind="evaluate",
    params=EvaluateSegmentationParams,
    entry="trainers.stages.evaluate_segmentation:run",
    datasets={"eval": "Shards with ground-truth objects (their categories are the semantic classes; a val split for "
                      "promotion, an eval split for the report).",
              "labels": "A generate-labels dataset whose rule is applied (the labels 'before fine-tuning'); absent: the "
                        "candidate's segmentation head predicts.",
              "labeled": "distance_matching: the few labeled images whose category embeddings vote."},
    models={"candidate": "The model evaluated: a finetune-segmentation file, or the file the labels' rule needs."},
    optional=frozenset({"labels", "labeled"}),
    output_dataset=True,
)
