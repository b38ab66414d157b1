"""Fixtures shared by the trainer tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime_helpers import write_partworld


@pytest.fixture(scope="session")
def tiny_partworld(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partworld")
    return {"train": write_partworld(root / "train", "train", 64, shard_size=16),
            "eval": write_partworld(root / "eval", "eval", 16, shard_size=8)}
