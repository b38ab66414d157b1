"""Atomic file IO and small helpers both planes use (one implementation each).

Nothing half-written is ever published: every write goes to a temp file in the same folder,
then ``os.replace`` renames it over the target (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on a clean exit fsync it and rename it over ``path``.

    On an exception the temp file is removed and ``path`` is untouched. Temp names are
    ``.<name>.tmp-<32 hex>``, so a cleaner can recognise strays left by a killed process.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """``data`` as JSON at ``path``, atomically."""
    return write_atomic(path, json.dumps(data, indent=indent, sort_keys=False, default=str))


def read_json(path: str | Path) -> Any | None:
    """The JSON document at ``path``, or None when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A recursive dict merge (a new dict; ``over`` wins, nested dicts merged key by key)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous the caller starts soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
