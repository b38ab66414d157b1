"""``evaluate-proposals``: class-agnostic part AR@k against held-out part masks (PartDistillation sec. 5.1)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams


class EvaluateProposalsParams(InputSizeParams):
    """Where the proposals come from and how recall is measured (sec. 5.1)."""

    baseline: Literal["strips"] | None = Field(default=None, description="'strips': evaluate the naive baseline (every instance cut into k equal-area strips along its major axis) instead of a model or dataset.")
    k: int = Field(default=4, ge=1, description="Strips per instance (baseline: strips).")
    objects: Literal["gt", "detected"] = Field(default="gt", description="Instances of the strips baseline: the records' objects or the teacher's detections (as mine-parts).")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections kept with score > this (strips of detected objects).")
    max_detections: int = Field(default=20, ge=1, description="Teacher predictions considered per image (strips of detected objects).")
    max_dets: tuple[int, ...] = Field(default=(1, 10, 50, 100, 200), min_length=1, description="The k of AR@k (sec. 5.1 reports AR@1/10/100).")
    top_k: int | None = Field(default=None, ge=1, description="Masks of a part model kept per image, best score first (None: max(max_dets)).")
    clip_to_objects: bool = Field(default=False, description="Intersect every proposal with the union of the GT objects before matching.")
    batch_size: int = Field(default=8, ge=1, description="Images per inference batch.")
    coco: bool = Field(default=True, description="Also run pycocotools COCOeval (useCats=0).")
    reference: Literal["parts", "pseudo_labels"] = Field(default="parts", description="The ground truth: the eval dataset's part masks, or its proposals (a teacher's pseudo-labels on held-out images without part labels: the label-free selection criterion; a dataset with part labels is refused).")


DEFINITION = StageDefinition(
    name="evaluate-proposals",
    summary="Class-agnostic part proposals' AR@k (greedy and COCOeval) on an evaluation split (PartDistillation sec. 5.1); exactly one source of proposals; the proposals written as COCO results files.",
    kind="evaluate",
    params=EvaluateProposalsParams,
    entry="trainers.stages.evaluate_proposals:run",
    datasets={"eval": "An evaluation split with part masks (the ground truth), or with reference: pseudo_labels a labelled dataset of held-out images without them.",
              "proposals": "A dataset whose records carry proposals (e.g. mine-parts on the eval images), matched by key."},
    models={"parts": "A part model run on the eval images (its top_k masks).",
            "candidate": "The same, under the runner's name for the model an evaluating stage promotes.",
            "teacher": "The instance teacher whose detections are cut into strips (baseline: strips, objects: detected)."},
    optional=frozenset({"proposals", "parts", "candidate", "teacher"}),
    output_dataset=True,
)
