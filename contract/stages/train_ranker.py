"""``train-ranker``: final self-training of the class-specific part model on cluster ids (PartDistillation sec. 4.3)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams
from contract.stages.training import TrainParams


class TrainRankerParams(TrainParams, InputSizeParams):
    """The engine's params (ranker defaults) plus decoder overrides, augmentation and round."""

    steps: int = Field(default=200, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps before the cosine decay.")
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides (decoder, loss, top_k) deep-merged over the part model's SegmenterConfig; the encoder is the "
                    "part model's, frozen, and decoder.num_classes is the label map's number of (class, cluster) labels.")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability (augmentation).")
    augment: Literal["flip", "strong"] = Field(default="flip", description="flip: random horizontal flips only; strong: the self-training student's strong augmentation (flip, random resized crop of crop_scale of the area, colour jitter), the teacher's labels transformed with the image.")
    crop_scale: tuple[float, float] = Field(default=(0.3, 1.0), description="augment strong: the random crop's share of the image area (min, max), resized back to the image size.")
    color_jitter: float = Field(default=0.4, ge=0, lt=1, description="augment strong: brightness, contrast and saturation factors drawn in [1 - this, 1 + this].")
    min_density_score: float = Field(default=0.0, ge=0, le=1, description="Pseudo-labels whose eq. 2 density score (the proposal's score in a rank-parts dataset) is below this are not targets (the eq. 2 score as the pseudo-label's confidence).")
    round: int = Field(default=1, ge=1, description="The final self-training round (sec. 4.3), recorded in the model file.")


DEFINITION = StageDefinition(
    name="train-ranker",
    summary="Class-specific part model: one label per (object class, cluster), trained on rank-parts' cluster ids (PartDistillation sec. 4.3 'Final self training').",
    kind="train",
    params=TrainRankerParams,
    entry="trainers.stages.train_ranker:run",
    datasets={"ranked_parts": "A rank-parts (or rank-pseudo-label, cluster-pixels) dataset with its label_map.json."},
    models={"parts": "The part-proposal model: its frozen encoder and, where shapes agree, its decoder.",
            "init": "The previous round's ranker (same label map): the model starts from it."},
    optional=frozenset({"init"}),
    output_model=True,
)
