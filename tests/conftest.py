import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread; OpenMP spinning on a loaded 2-core runner costs several x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
