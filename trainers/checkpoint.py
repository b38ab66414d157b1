"""Checkpoint/resume for DeepSpeed engines, published atomically (docs/architecture.md "Idempotent and resumable").

DeepSpeed's own ``latest`` file is written by rank 0 before the other ranks have finished
their shards, and not atomically. Here every rank writes its shards with ``save_latest=False``;
after a barrier rank 0 drops a ``COMPLETE`` marker into the tag directory and only then
replaces ``latest`` (temp file, then rename). A restart reads ``latest`` and loads that tag,
so a checkpoint that was half written when the job died is never picked up.

A published checkpoint that cannot be loaded (a file truncated or corrupted on disk, ``latest``
naming a tag that is gone) is not the end of the run: :meth:`Checkpointer.load` falls back to the
next older complete checkpoint (``keep`` of them stay on disk) and logs a warning naming both; the
ranks agree on the tag they load. A save that fails (a full disk) raises :class:`CheckpointError`
naming the path, and publishes nothing.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from contract.io import write_atomic
from trainers.comm import all_gather

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none of the published ones could be loaded; names the path."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _is_disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _describe_write_failure(path: Path, e: BaseException) -> str:
    """What went wrong, named by path: torch's writer reports a full disk as a bare stream error, so the free space
    of the file system decides (under 4 MiB or 1% left: full)."""
    usage = None
    for p in (path, *path.parents):
        try:
            usage = shutil.disk_usage(p)
            break
        except OSError:
            continue
    full = _is_disk_full(e) or (usage is not None and usage.free < max(4 << 20, usage.total // 100))
    what = f"disk full (no space left on device: {usage.free if usage else 0} bytes free)" if full else \
        f"{type(e).__name__}: {e}"
    return f"{path}: writing the checkpoint failed: {what}; nothing was published, the previous checkpoint stays"


class Checkpointer:
    """Saves and restores one engine under ``directory``; keeps the newest ``keep`` complete checkpoints."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.loaded_tag: str | None = None  # the tag :meth:`load` restored

    # -- reading (any rank) -----------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """Tag named by ``latest`` if that checkpoint is complete, else None."""
        try:
            tag = (self.directory / LATEST).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        if not tag.startswith("step") or "/" in tag:
            return None
        return tag if (self.directory / tag / COMPLETE).is_file() else None

    def complete_tags(self) -> list[str]:
        """Every complete checkpoint's tag, newest first."""
        try:
            tags = [p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step")]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted((t for t in tags if (self.directory / t / COMPLETE).is_file()), reverse=True)

    def candidates(self) -> list[str]:
        """Tags :meth:`load` tries in order: the one ``latest`` names, then the other complete ones, newest first."""
        latest = self.latest_tag()
        rest = [t for t in self.complete_tags() if t != latest]
        return ([latest] if latest else []) + rest

    def load(self, engine) -> dict[str, Any] | None:
        """Restore module, optimizer, LR schedule from the latest loadable complete checkpoint; return its client state.

        Collective when the process group is up: every rank tries the same tags in the same order and moves on
        together as soon as one rank fails to load one. None when there is no checkpoint at all; CheckpointError
        when checkpoints exist but none loads."""
        self.loaded_tag = None
        distributed = dist.is_initialized()
        tags = self.candidates()
        if distributed:  # rank 0's view decides, so that ranks never walk different lists
            holder = [tags]
            dist.broadcast_object_list(holder, src=0)
            tags = holder[0]
        latest = self.directory / LATEST
        if not tags:
            if latest.exists():
                log.warning("%s names no complete checkpoint and none other is complete: starting from step 0", latest)
            return None
        if self.latest_tag() is None and latest.exists():
            log.warning("%s names no complete checkpoint: falling back to %s", latest, tags[0])
        failures: list[str] = []
        for tag in tags:
            error = None
            try:
                path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
                if path is None:
                    error = "DeepSpeed found no checkpoint there"
            except Exception as e:  # truncated or corrupt files: torch.load, pickle, zip or DeepSpeed errors
                error = f"{type(e).__name__}: {e}"
                client_state = None
            if distributed:  # every rank's outcome: all move on together
                errors = all_gather(error)
                error = next((f"rank {r}: {x}" for r, x in enumerate(errors) if x is not None), None)
            if error is None:
                self.loaded_tag = tag
                if failures:
                    log.warning("resumed from the older checkpoint %s: %s", self.directory / tag, "; ".join(failures))
                return client_state
            failures.append(f"{self.directory / tag} could not be loaded ({error})")
            log.warning("checkpoint %s could not be loaded (%s): falling back to the previous one", self.directory / tag,
                        error)
        raise CheckpointError("no checkpoint under " + str(self.directory) + " could be loaded: " + "; ".join(failures))

    # -- writing (all ranks) ----------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective: every rank writes its shards, then rank 0 publishes the tag and prunes old ones.

        A failed write (a full disk) removes the unpublished tag directory and raises CheckpointError naming it;
        ``latest`` still names the previous checkpoint."""
        tag = step_tag(step)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and (self.directory / tag).exists():
            # leftovers of a save that died half way through: never mix them with the new shards
            shutil.rmtree(self.directory / tag)
        if dist.is_initialized():
            dist.barrier()
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:
            message = _describe_write_failure(self.directory / tag, e)
            shutil.rmtree(self.directory / tag, ignore_errors=True)  # never published: free the space it took
            raise CheckpointError(message) from e
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if rank == 0:
            try:
                write_atomic(self.directory / tag / COMPLETE, json.dumps({"step": step}))
                write_atomic(self.directory / LATEST, tag)
            except OSError as e:
                message = _describe_write_failure(self.directory / tag, e)
                shutil.rmtree(self.directory / tag, ignore_errors=True)
                raise CheckpointError(message) from e
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
