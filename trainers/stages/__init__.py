"""Trainer stages by name: the ``<stage>`` of ``python -m trainers <stage> --spec <file>``.

A plain dict (STYLE.md: no deep registries). Each entry is ``module:function``, imported only
when its stage runs; the function takes the :class:`~contract.spec.StageSpec` and returns a
:class:`StageResult` on rank 0 (None or a result elsewhere).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

STAGES: dict[str, str] = {
    "fit-objects": "trainers.stages.fit_objects:run",
    "instance-teacher": "trainers.stages.instance_teacher:run",
    "train-proposals": "trainers.stages.train_proposals:run",
    "pseudo-label": "trainers.stages.pseudo_label:run",
    "mine-parts": "trainers.stages.mine_parts:run",
    "evaluate-proposals": "trainers.stages.evaluate_proposals:run",
    "evaluate-parts": "trainers.stages.evaluate_parts:run",
    "cluster-pixels": "trainers.stages.cluster_pixels:run",
    "rank-parts": "trainers.stages.rank_parts:run",
    "train-ranker": "trainers.stages.train_ranker:run",
    "rank-pseudo-label": "trainers.stages.train_ranker:run_relabel",
}


@dataclass
class StageResult:
    """What a stage reports; rank 0 writes it to ``<workdir>/result.json``."""

    metrics: dict[str, float] = field(default_factory=dict)
    model_path: str | None = None
    dataset_path: str | None = None
    steps: int = 0


class UnknownStage(KeyError):
    def __str__(self) -> str:
        return f"unknown stage {self.args[0]!r}; known stages: {', '.join(sorted(STAGES))}"


def get_stage(name: str) -> Callable[[Any], StageResult | None]:
    """The stage function for ``name`` (imports its module)."""
    if name not in STAGES:
        raise UnknownStage(name)
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)
