import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared CPU cores: one thread is the fastest (more threads than free cores is 20-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
