import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs on one intra-op thread: tiny models run fastest so, and OpenMP spinning on a loaded 2-core
    runner costs several times the work. Processes a test starts set their own (OMP_NUM_THREADS or
    torch.set_num_threads in the worker); a test that changes the setting puts it back."""
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
    "test_readme.py": ("command_line_runs_as_written",),  # every command line of the README, in order
    "test_ablations.py": ("reproduce_script",),  # benchmarks/reproduce_fmnist.py: several rows, each a chain of runs
    # a `pip install` of the built wheel into a fresh environment
    "test_packaging.py": None,
}
# Fixtures that run a whole pipeline or several processes once for the tests that read their outputs:
SLOW_FIXTURES = {
    "fast_run",  # test_quickstart.py: the whole demo pipeline
    "outcomes",  # test_failures.py: five training processes with loader workers at once, each made to fail
    "run_dir",  # test_user_errors.py: a training run in a subprocess, then reruns into its folder
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_TESTS.get(item.path.name, ())
        if names is None or any(s in item.name for s in names) or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
