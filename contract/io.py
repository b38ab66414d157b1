"""Atomic file IO and small helpers both planes use (one implementation each).

Nothing half-written is ever published: every write goes to a temp file in the same folder,
then ``os.replace`` renames it over the target (atomic on POSIX).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically: temp file, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
