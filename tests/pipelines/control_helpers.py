"""Helpers for control-plane tests: configs in a temp workspace, the stand-in trainer program and its executor."""
from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig, config_from_dict
from pipelines.executors.local import LocalExecutor

PROGRAM = Path(__file__).with_name("rank_program.py")
REPO = Path(__file__).resolve().parents[2]


def make_config(tmp_path: Path, **overrides: Any) -> PipelineConfig:
    """A config whose workspace lives in ``tmp_path``; ``overrides`` are top-level sections."""
    data: dict[str, Any] = {"workspace": {"root": str(tmp_path / "ws")}}
    data.update(overrides)
    return config_from_dict(data, base_dir=tmp_path)


def with_program(job: dict[str, Any], env: dict[str, str], args: list[str] | None = None) -> dict[str, Any]:
    """The rendered job with the stand-in program as the container command (env appended to the container's)."""
    job = copy.deepcopy(job)
    for rs in job["spec"]["pytorchReplicaSpecs"].values():
        c = rs["template"]["spec"]["containers"][0]
        c["command"] = [sys.executable, str(PROGRAM)]
        c["args"] = args if args is not None else ["--master=$(MASTER_ADDR):$(MASTER_PORT)"]
        c["env"] = c.get("env", []) + [{"name": k, "value": v} for k, v in env.items()]
    return job


class ProgramExecutor:
    """The real local executor, running the stand-in program instead of ``torchrun -m trainers``."""

    def __init__(self, env: dict[str, str], grace_seconds: float = 3.0):
        self.env = env
        self.inner = LocalExecutor(grace_seconds=grace_seconds, echo=lambda line: None)

    def run(self, job, log_dir=None):
        return self.inner.run(with_program(job, self.env), log_dir=log_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
