"""``finetune-segmentation``: a segmentation head on the representation, trained on the generated labels (PASS sec. 4.4)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class FinetuneSegmentationParams(TrainParams):
    """The engine's params plus the crops and the targets."""

    steps: int = Field(default=300, ge=1, description="Optimizer steps (sec. 5.1: 20 epochs on ImageNet-S50).")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate (AdamW; the paper: LARS at 0.6).")
    weight_decay: float = Field(default=1e-6, ge=0, description="Weight decay (1e-6).")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1, description="The cosine decays to lr x this.")
    crop_size: int = Field(default=224, ge=16, description="Side of the random resized training crops (images and labels).")
    crop_scale: tuple[float, float] = Field(default=(0.5, 1.0), description="Area fraction of the training crops.")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability.")
    targets: Literal["generated", "ground_truth"] = Field(
        default="generated",
        description="generated: the labels of a generate-labels dataset (K from its rule; a record with ground-truth "
                    "objects is an error); ground_truth: the objects of a labelled split painted as categories (the "
                    "semi-supervised protocol, sec. 3.2.1).")


DEFINITION = StageDefinition(
    name="finetune-segmentation",
    summary="The representation plus a 1x1 conv with K+1 channels, trained by cross-entropy on the generated pixel labels "
            "(PASS sec. 4.4; with ground-truth targets the semi-supervised protocol).",
    kind="train",
    params=FinetuneSegmentationParams,
    entry="trainers.stages.finetune_segmentation:run",
    datasets={"train": "A generate-labels dataset (or, targets: ground_truth, shards with object labels)."},
    models={"representation": "The represent model file whose backbone is fine-tuned."},
    output_model=True,
)
