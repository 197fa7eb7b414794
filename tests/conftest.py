import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread; OpenMP spinning on a loaded 2-core runner costs several x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Tests marked `slow` (deselect them with `-m "not slow"`; `make test` runs everything). Each entry: a test file and
# the substrings of the test names to mark (None: the whole file), kept to the multi-process and end-to-end runs.
SLOW_TESTS: dict[str, tuple[str, ...] | None] = {
    # real gloo / torchrun / mp.spawn process groups: every rank starts its own interpreter and torch
    "test_quantizer_ranks.py": None,
    "test_tokenizer_eval_ranks.py": None,
    "test_distributed.py": ("three_ranks", "sigterm_to", "failing_rank", "two_rank_features"),
    "test_codebook_usage.py": ("every_rank_codebook",),
    "test_failures.py": ("torchrun_job",),
    # whole commands end to end, several of them a run, a stop and a bitwise-compared resume
    "test_train_commands.py": ("torchrun", "end_to_end", "bitwise", "webdataset", "fashion_mnist_idx"),
    "test_fidelity.py": ("bitwise",),
    "test_segmentation.py": ("bitwise",),
    "test_wandb.py": ("resume",),
    # a `pip install` of the built wheel into a fresh environment
    "test_packaging.py": None,
}
SLOW_FIXTURES = {"fast_run"}  # test_quickstart.py: the whole demo pipeline, shared by the tests reading its outputs


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_TESTS.get(item.path.name, ())
        if names is None or any(s in item.name for s in names) or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
