import pytest
import torch


@pytest.fixture(autouse=True)
def _light_torch():
    """Two shared cores: one thread per test; flush denormals (AdamW near convergence crawls without it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)
