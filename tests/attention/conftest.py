"""The attention tests work on tiny tensors, where intra-op threads cost more than they
save (and spin against the other processes of a busy machine): run them on one thread,
restoring the setting afterwards."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
