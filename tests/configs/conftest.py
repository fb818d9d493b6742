"""Shared set-up of these tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread, then restore the setting.

    `make test` runs two pytest workers on two cores; with two threads each,
    the workers' OpenMP barriers spin against each other and a small forward
    pass can take a hundred times longer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
