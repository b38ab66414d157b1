"""Params every stage that runs the instance or part models on images shares: the input size.

Not a stage: the params models of the PartDistillation stages (``instance-teacher``, ``mine-parts``,
``train-proposals``, ``evaluate-proposals``, ``pseudo-label``, ``rank-parts``, ``train-ranker``,
``rank-pseudo-label``, ``evaluate-parts``, ``cluster-pixels``) mix in :class:`InputSizeParams`; the data plane applies it
in one place (``trainers.data.batches.InputSize``).
"""
from __future__ import annotations

from pydantic import Field, model_validator

from contract.stages import Params


class InputSizeParams(Params):
    """detectron2's ResizeShortestEdge convention (``INPUT.MIN_SIZE_*`` / ``INPUT.MAX_SIZE_*``): the shortest edge is
    resized to ``min_size`` unless the longest would then exceed ``max_size``; both None: images as stored."""

    min_size: int | None = Field(
        default=None, ge=1,
        description="Images enter the models (training and inference) with their shortest edge resized to this, unless "
                    "the longest would then exceed max_size (detectron2's INPUT.MIN_SIZE_*); None: as stored. Predictions "
                    "are mapped back to the stored resolution before they are scored or written.")
    max_size: int | None = Field(
        default=None, ge=1,
        description="The longest edge of a resized image never exceeds this (detectron2's INPUT.MAX_SIZE_*); with "
                    "min_size None, only larger images are shrunk; None: no bound.")

    @model_validator(mode="after")
    def _max_not_below_min(self):
        if self.min_size is not None and self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least min_size ({self.min_size})")
        return self
