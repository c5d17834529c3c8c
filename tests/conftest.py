"""Suite-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test model is tiny: one intra-op thread avoids OpenMP overhead, which on a shared 2-core
    machine makes threads wait on each other (a test's results never depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
