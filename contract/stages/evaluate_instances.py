"""``evaluate-instances``: class-specific and class-agnostic mask AP of an instance model, with its predictions as COCO files (CaSP sec. 4, Table 2)."""
from __future__ import annotations

from pydantic import Field

from contract.stages import Params, StageDefinition


class EvaluateInstancesParams(Params):
    """Inference on one split, COCOeval (segm) twice: per class, and over one category (every class mapped to 'object')."""

    score_threshold: float = Field(default=0.0, ge=0, lt=1, description="Predictions kept (written and evaluated) with score > this; an image left with none is counted.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")


DEFINITION = StageDefinition(
    name="evaluate-instances",
    summary="Mask AP (COCOeval segm) of an instance model per class and over one category (AP^seg, AP^seg-a of CaSP "
            "Table 2); the predictions written as COCO results files.",
    kind="evaluate",
    params=EvaluateInstancesParams,
    entry="trainers.stages.evaluate_instances:run",
    datasets={"eval": "Shards with ground-truth objects (a val split for promotion, an eval split for the report)."},
    models={"candidate": "The instance model evaluated (the input an evaluating stage promotes)."},
    output_dataset=True,
)
