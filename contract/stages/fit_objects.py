"""``fit-objects``: a small CNN learning object classes per pixel; exercises the engine and the stage runtime."""
from __future__ import annotations

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class FitObjectsParams(TrainParams):
    """The engine's params plus the network's size."""

    image_size: int = Field(default=64, ge=4, description="Square side images (and labels) are resized to.")
    width: int = Field(default=32, ge=8, description="Channels of the network (a multiple of 8: GroupNorm groups).")


DEFINITION = StageDefinition(
    name="fit-objects",
    summary="A small CNN learning object classes per pixel (stride-4 logits); an end-to-end check of the engine, not part of the paper.",
    kind="train",
    params=FitObjectsParams,
    entry="trainers.stages.fit_objects:run",
    datasets={"train": "Shards with object labels to train on.", "eval": "Shards evaluated after training (pixel accuracy, mIoU)."},
    optional=frozenset({"eval"}),
    output_model=True,
)
