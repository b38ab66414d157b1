import pytest
import torch
import torch.distributed as dist

from runtime_helpers import free_port


@pytest.fixture(autouse=True)
def _light_torch():
    """Two shared cores: one thread per in-process test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank(monkeypatch):
    """The stage in this process as a world of one (gloo), torn down afterwards."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
