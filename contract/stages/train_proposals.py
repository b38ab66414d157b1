"""``train-proposals``: the class-agnostic part decoder D^p trained on part proposals (PartDistillation sec. 4.2)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams
from contract.stages.training import TrainParams, merged_over

# 1-4 objects x up to ~6 parts per PartWorld image: 40 queries leave room for misses and background.
# On the demo PartWorld, 400 steps of 2 ranks x 4 images take ~3 minutes on 2 shared CPU cores.
MODEL = {
    "decoder": {"num_queries": 40, "hidden_dim": 64, "num_heads": 4, "dim_feedforward": 256, "num_layers": 3},
    # Mask2Former's weights (class 2, mask BCE 5, dice 5): the class term learns far faster than with 1/20/1
    "loss": {"num_points": 1024, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0},
    "top_k": 40,
}


class TrainProposalsParams(TrainParams, InputSizeParams):
    """The engine's params (part-decoder defaults) plus the decoder, augmentation and round."""

    steps: int = Field(default=400, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps before the cosine decay.")
    model: dict[str, Any] = Field(
        default_factory=lambda: merged_over(MODEL)({}),
        description="D^p's decoder, loss and top_k (a SegmenterConfig without encoder); a given dict is deep-merged over "
                    "this default. The encoder is always the teacher's, frozen (sec. 4.1), and decoder.num_classes is 1.")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability (augmentation).")
    augment: Literal["flip", "strong"] = Field(default="flip", description="flip: random horizontal flips only; strong: the self-training student's strong augmentation (flip, random resized crop of crop_scale of the area, colour jitter), the teacher's labels transformed with the image.")
    crop_scale: tuple[float, float] = Field(default=(0.3, 1.0), description="augment strong: the random crop's share of the image area (min, max), resized back to the image size.")
    color_jitter: float = Field(default=0.4, ge=0, lt=1, description="augment strong: brightness, contrast and saturation factors drawn in [1 - this, 1 + this].")
    round: int = Field(default=1, ge=1, description="The self-training round (sec. 4.2), recorded in the model file.")

    _merge_model = field_validator("model", mode="before")(lambda cls, v: merged_over(MODEL)(v))


DEFINITION = StageDefinition(
    name="train-proposals",
    summary="Class-agnostic part decoder D^p on the frozen teacher encoder, trained on part proposals (PartDistillation sec. 4.2).",
    kind="train",
    params=TrainProposalsParams,
    entry="trainers.stages.train_proposals:run",
    datasets={"proposals": "Mined parts (round 1) or the previous round's pseudo-labels: every proposal is a class-0 target."},
    models={"teacher": "The instance teacher: its encoder E, frozen.",
            "init": "The previous round's part model: D^p starts from its decoder."},
    optional=frozenset({"init"}),
    output_model=True,
)
