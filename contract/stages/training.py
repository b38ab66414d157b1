"""Params every training stage shares: the engine's (``trainers.engine.fit``), with its defaults.

Not a stage: the params models of ``fit-objects``, ``instance-teacher``, ``train-proposals`` and
``train-ranker`` subclass :class:`TrainParams` and restate only the defaults they change.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field

from contract.io import deep_merge
from contract.stages import Params


class TrainParams(Params):
    """Optimizer, schedule, checkpointing and data loading of the training engine."""

    steps: int = Field(default=100, ge=1, description="Optimizer steps to train in total (a resumed run counts the steps already done).")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="The cosine decays to lr * min_lr_ratio at the last step.")
    checkpoint_every: int = Field(default=50, ge=1, description="Steps between checkpoints (the last step is always checkpointed).")
    keep_checkpoints: int = Field(default=2, ge=1, description="Complete checkpoints kept on disk.")
    log_every: int = Field(default=1, ge=1, description="Steps between metric records (MLflow, progress bar).")
    seed: int = Field(default=0, description="Model init uses seed on every rank; data order and augmentation use seed + rank.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank.")
    nonfinite_loss: Literal["stop", "skip"] = Field(
        default="stop",
        description="A NaN or infinite loss on any rank: stop (every rank fails, naming the step) or skip (that step's "
                    "update is not applied; logged and counted in the train/skipped metric).")


def merged_over(defaults: dict[str, Any]):
    """A ``mode="before"`` validator body: the given overrides deep-merged over ``defaults`` (a model-architecture dict)."""

    def merge(value: Any) -> Any:
        if value is None:
            value = {}
        return deep_merge(copy.deepcopy(defaults), value) if isinstance(value, dict) else value

    return merge
