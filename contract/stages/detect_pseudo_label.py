"""``detect-pseudo-label``: a labeling detector's predictions with score > delta as pseudo-labels (CaSP sec. 3.1, eq. 2-3)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.stages import Params, StageDefinition


class DetectPseudoLabelParams(Params):
    """Eq. 2 (one constant threshold delta, no per-class thresholds) and eq. 3 (images without a pseudo-label leave D^p)."""

    delta: float = Field(default=0.2, ge=0, lt=1, description="Predictions kept with score > delta (Table 7: 0.2).")
    nms_iou: float | None = Field(
        default=0.6, gt=0, le=1,
        description="Greedy mask NMS before delta: a prediction overlapping a better-scored one (of its class when "
                    "class-specific) with mask IoU above this is dropped; null: every prediction kept. The paper's "
                    "detector (CondInst on FCOS, sec. 3.4) suppresses overlaps at IoU 0.6 in its inference; a query-based "
                    "detector has no NMS of its own (docs/casp.md \"Choices\").")
    class_agnostic: bool = Field(
        default=True,
        description="alpha(.): pseudo-labels carry no class (CaSP); false keeps each prediction's class as category_id "
                    "(the class-specific pseudo-label baseline, Table 2 'Objects(P,S)').")
    entities: bool = Field(
        default=False,
        description="CaSP sec. 3.3: the detector is an entity detector (instance-teacher entities: true, trained on things "
                    "and stuff) and its pseudo-labels keep stuff regions as entities; needs class_agnostic. A detector "
                    "whose file says otherwise is refused (object pseudo-labels from an entity detector would carry stuff).")
    augment: Literal["none", "flip", "jitter"] = Field(
        default="none",
        description="Image augmentation before labeling, seeded by (seed, key); the augmented image is what the output "
                    "stores: none, flip (weak: horizontal flip p=0.5), jitter (strong: flip + brightness/contrast x U(0.7, 1.3)).")
    max_detections: int = Field(default=20, ge=1, description="Labeling-detector predictions considered per image (top-k).")
    seed: int = Field(default=0, description="Augmentation seed.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")

    @model_validator(mode="after")
    def _entities_are_class_free(self) -> "DetectPseudoLabelParams":
        if self.entities and not self.class_agnostic:
            raise ValueError("entities: true needs class_agnostic: true (an entity has no class, CaSP sec. 3.3)")
        return self


DEFINITION = StageDefinition(
    name="detect-pseudo-label",
    summary="A labeling detector's predictions with score > delta on unlabeled images, images without one dropped: "
            "the pseudo-label set D^p (CaSP sec. 3.1, eq. 2-3).",
    kind="label",
    params=DetectPseudoLabelParams,
    entry="trainers.stages.detect_pseudo_label:run",
    datasets={"images": "Unlabeled shards (ground-truth objects, if any, are never copied)."},
    models={"detector": "The labeling detector (an instance-teacher segmenter, class-agnostic for CaSP)."},
    output_dataset=True,
)
