"""Checkpoint/resume for DeepSpeed engines, published atomically (docs/architecture.md "Idempotent and resumable").

DeepSpeed's own ``latest`` file is written by rank 0 before the other ranks have finished
their shards, and not atomically. Here every rank writes its shards with ``save_latest=False``;
after a barrier rank 0 drops a ``COMPLETE`` marker into the tag directory and only then
replaces ``latest`` (temp file, then rename). A restart reads ``latest`` and loads that tag,
so a checkpoint that was half written when the job died is never picked up.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from contract.io import write_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


class Checkpointer:
    """Saves and restores one engine under ``directory``; keeps the newest ``keep`` complete checkpoints."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, keep)

    # -- reading (any rank) -----------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """Tag named by ``latest`` if that checkpoint is complete, else None."""
        try:
            tag = (self.directory / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return tag if (self.directory / tag / COMPLETE).is_file() else None

    def load(self, engine) -> dict[str, Any] | None:
        """Restore module, optimizer, LR schedule from the latest complete checkpoint; return its client state."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")
        return client_state

    # -- writing (all ranks) ----------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective: every rank writes its shards, then rank 0 publishes the tag and prunes old ones."""
        tag = step_tag(step)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and (self.directory / tag).exists():
            # leftovers of a save that died half way through: never mix them with the new shards
            shutil.rmtree(self.directory / tag)
        if dist.is_initialized():
            dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if rank == 0:
            write_atomic(self.directory / tag / COMPLETE, json.dumps({"step": step}))
            write_atomic(self.directory / LATEST, tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step"))
        complete = [t for t in tags if (self.directory / t / COMPLETE).is_file()]
        keep = set(complete[-self.keep:]) | {keep_tag}
        for t in tags:
            if t not in keep:
                shutil.rmtree(self.directory / t, ignore_errors=True)
