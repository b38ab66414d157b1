"""Fixtures shared by the trainer tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from contract.io import free_port
from runtime_helpers import write_partworld


@pytest.fixture(scope="session")
def tiny_partworld(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partworld")
    return {"train": write_partworld(root / "train", "train", 64, shard_size=16),
            "eval": write_partworld(root / "eval", "eval", 16, shard_size=8)}


@pytest.fixture
def one_rank(monkeypatch):
    """The stage in this process as a world of one (gloo), torn down afterwards."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
