"""Set-up shared by the whole test suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread, then restore the setting.

    `make test` runs two pytest workers on two cores; with two threads each,
    oneDNN/OpenMP barriers spin against the other worker and a small forward
    pass can take 10-100x longer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
