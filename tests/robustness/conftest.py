"""Shared set-up of the robustness tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread, then restore the setting.

    `make test` runs two pytest workers on two cores; with two threads each,
    oneDNN's thread barriers spin against the other worker and a convolution
    can take 50x longer. One thread per worker keeps the suite fast.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
