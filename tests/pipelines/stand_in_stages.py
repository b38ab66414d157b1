"""Stand-in trainers for control-plane tests: definitions of the cheap programs tests run instead of real stages.

Control-plane tests run ``tests/pipelines/rank_program.py`` in place of ``torchrun -m trainers``;
their configs name these trainers, so the registry must know them (a config naming an unknown
trainer is rejected). Their params are free-form: the stand-in program reads what a test gives it.
"""
from __future__ import annotations

from pydantic import ConfigDict

from contract import stages as registry


class StandInParams(registry.Params):
    """Any keys (the stand-in program's knobs)."""

    model_config = ConfigDict(extra="allow")


NAMES = ("a", "b", "c", "alone", "consume", "eval", "evaluate", "label", "produce", "train", "use")


def register() -> None:
    """Add the stand-in definitions to the registry (idempotent)."""
    for name in NAMES:
        registry.STAGES.setdefault(name, registry.StageDefinition(
            name=name, summary="stand-in trainer of the control-plane tests", kind="label", params=StandInParams,
            entry="tests.pipelines.rank_program:main"))
