"""The stage programs: one module per trainer, each holding its program only (docs/architecture.md "The stage registry").

Which module runs for ``python -m trainers <stage>`` is declared by the stage's definition in
``contract.stages`` (``entry``: ``module:function``); the function takes the
:class:`~contract.spec.StageSpec` and returns a :class:`StageResult` on rank 0 (None elsewhere).
Stage modules never import each other: code two stages need lives in the library
(``trainers.parts``, ``trainers.evaluation``, ``trainers.models``, ``trainers.comm``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    """What a stage reports; rank 0 writes it to ``<workdir>/result.json``."""

    metrics: dict[str, float] = field(default_factory=dict)
    model_path: str | None = None
    dataset_path: str | None = None
    steps: int = 0
