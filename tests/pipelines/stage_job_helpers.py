"""Helpers for tests of whole stage jobs: the rendered job as it is (``python -m pipelines.stage_job``), with the
stand-in program (rank_program.py) as its trainer instead of ``torchrun -m trainers``."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from control_helpers import PROGRAM
from pipelines.executors.local import LocalExecutor
from pipelines.render import spec_of


def with_stand_in(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job with ``SELFTRAIN_TRAINER_COMMAND`` naming the stand-in program (its records in ``<workdir>/out``)."""
    job = copy.deepcopy(job)
    out = str(Path(spec_of(job).outputs.workdir).with_name(spec_of(job).name + ".out"))
    extra = {"SELFTRAIN_TRAINER_COMMAND": json.dumps([sys.executable, str(PROGRAM)]), "OUT": out, "WRITE_RESULT": "1", **(env or {})}
    for rs in job["spec"]["pytorchReplicaSpecs"].values():
        c = rs["template"]["spec"]["containers"][0]
        c["env"] = c.get("env", []) + [{"name": k, "value": v} for k, v in extra.items()]
    return job


class StandInExecutor:
    """The real local executor running rendered jobs unchanged but for the stand-in trainer; records what it ran."""

    def __init__(self, env: dict[str, str] | None = None, grace_seconds: float = 5.0, per_stage: dict[str, dict[str, str]] | None = None, **kw: Any):
        self.env = env or {}
        self.per_stage = per_stage or {}
        self.inner = LocalExecutor(grace_seconds=grace_seconds, echo=lambda line: None, **kw)
        self.jobs: list[dict[str, Any]] = []
        self.spans: dict[str, tuple[float, float]] = {}  # stage name -> (start, end), monotonic seconds

    def run(self, job, log_dir=None):
        self.jobs.append(job)
        name = spec_of(job).name
        start = time.monotonic()
        try:
            return self.inner.run(with_stand_in(job, {**self.env, **self.per_stage.get(name, {})}), log_dir=log_dir)
        finally:
            self.spans[name] = (start, time.monotonic())
