"""Stage tests in this process: one torch thread each (the one_rank fixture is in tests/trainers/conftest.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _light_torch():
    """Two shared cores: one thread per in-process test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
