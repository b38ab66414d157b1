"""``train-ranker``: final self-training of the class-specific part model on cluster ids (PartDistillation sec. 4.3)."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class TrainRankerParams(TrainParams):
    """The engine's params (ranker defaults) plus decoder overrides, augmentation and round."""

    steps: int = Field(default=200, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps before the cosine decay.")
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides (decoder, loss, top_k) deep-merged over the part model's SegmenterConfig; the encoder is the "
                    "part model's, frozen, and decoder.num_classes is the label map's number of (class, cluster) labels.")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability (augmentation).")
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
