"""Executors run a rendered PyTorchJob: ``local`` (processes on this machine) or ``kubernetes``.

(The third executor kind, ``render``, only writes manifests: see :func:`pipelines.render.write_manifests`.)
Every executor takes the job as a manifest dict (``render.render_stage`` / a YAML file) and either
returns an :class:`ExecutionResult` or raises :class:`StageFailed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class ReplicaOutcome:
    """How one replica (pod) ended in the last attempt."""

    replica: str  # e.g. "master-0", "worker-1"
    exit_code: int | None  # None: still running when stopped; 128+N: killed by signal N
    stopped: bool = False  # True: stopped by the executor because another replica failed
    log: Path | None = None
    last_lines: list[str] = field(default_factory=list)


@dataclass
class ExecutionResult:
    job: str
    attempts: int
    replicas: list[ReplicaOutcome]
    log_dir: Path | None = None


class StageFailed(RuntimeError):
    """A stage failed for good (after its restarts); the message names the replicas, exit codes and last log lines."""

    def __init__(self, job: str, attempts: int, replicas: list[ReplicaOutcome], reason: str = ""):
        self.job, self.attempts, self.replicas = job, attempts, replicas
        failed = [r for r in replicas if not r.stopped and r.exit_code not in (0, None)]
        parts = [f"stage {job} failed after {attempts} attempt(s){': ' + reason if reason else ''}"]
        for r in replicas:
            state = "stopped by the executor" if r.stopped else f"exit code {r.exit_code}"
            parts.append(f"  {r.replica}: {state}" + (f" (log: {r.log})" if r.log else ""))
        for r in failed or replicas[:1]:
            if r.last_lines:
                parts.append(f"--- last lines of {r.replica} ---")
                parts.extend("  " + line for line in r.last_lines)
        super().__init__("\n".join(parts))


class Executor(Protocol):
    def run(self, job: dict[str, Any], log_dir: str | Path | None = None) -> ExecutionResult: ...


def make_executor(kind: str, **kwargs: Any) -> Executor:
    """The executor for a config's ``executor.kind`` (``render`` has none: it writes manifests)."""
    if kind == "local":
        from pipelines.executors.local import LocalExecutor

        return LocalExecutor(**kwargs)
    if kind == "kubernetes":
        try:
            from pipelines.executors.kubernetes import KubernetesExecutor  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError("executor kind 'kubernetes' is not available in this build (use local, or render and kubectl apply)") from e
        return KubernetesExecutor(**kwargs)
    raise ValueError(f"executor kind {kind!r} does not run jobs (render writes manifests; known runners: local, kubernetes)")
