"""`TokenizerTask.evaluate` under 2 real gloo processes with uneven batches: every rank reports the metrics of all
ranks' images, computed by hand in one process (see test_task_references.py for the single-process checks)."""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_task_references import (
    assert_metrics,
    tokenizer_metrics_by_hand,
    tokenizer_task,
    trained_tokenizer_task,
    val_batches,
    val_loader,
    write_teacher,
)


def _evaluate_worker(rank: int, world: int, init_file: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        state = torch.load(Path(tmp) / "state.pt", weights_only=True)
        task = tokenizer_task(Path(state["teacher"]))
        task.model.load_state_dict(state["model"])
        task.model.quantize.usage_counts.copy_(state["usage"])
        task.eval()
        batches = val_batches()
        mine = batches[:2] if rank == 0 else batches[2:]  # rank 0 sees 2 batches, rank 1 one
        out = task.evaluate(val_loader(mine) if rank == 0 else [{"num_skipped": 3}, {"tokenizer_image": mine[0]}],
                            torch.device("cpu"), contextlib.nullcontext)
        torch.save({"out": out, "usage": task.model.quantize.usage_counts.clone()}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_tokenizer_evaluate_over_two_ranks_with_uneven_batches_equals_one_pass_over_all(tmp_path):
    """2 gloo processes, 2 batches on rank 0 and 1 on rank 1: both ranks report the metrics of all 6 images (the
    sums and the usage histogram all-reduced once after the loop) and keep their own training-time counts."""
    teacher_path = write_teacher(tmp_path)
    task = trained_tokenizer_task(teacher_path)
    saved = task.model.quantize.usage_counts.clone()
    torch.save({"teacher": str(teacher_path), "model": task.model.state_dict(), "usage": saved}, tmp_path / "state.pt")
    mp.spawn(_evaluate_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = tokenizer_metrics_by_hand(task, torch.cat(val_batches()))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert_metrics(r["out"], want)
        assert torch.equal(r["usage"], saved)

