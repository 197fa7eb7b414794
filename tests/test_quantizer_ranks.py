"""The quantizer under 2 real gloo processes: k-means init identical on all ranks, on the samples of all ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from beitv2.models.quantizer import NormEMAQuantizer, QuantizerConfig


def rank_points(rank: int) -> torch.Tensor:
    """Each rank sees different clusters, so a per-rank k-means would give different codebooks."""
    g = torch.Generator().manual_seed(100 + rank)
    centers = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    return F.normalize(centers.repeat_interleave(16, 0) + 0.05 * torch.randn(64, 8, generator=g), dim=-1)


def quantizer() -> NormEMAQuantizer:
    return NormEMAQuantizer(QuantizerConfig(num_codes=6, code_dim=8, kmeans_init=True, decay=0.9)).train()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = quantizer()
        q(rank_points(rank)[None])  # lazy k-means init on the first training batch, then one EMA update
        torch.save({"codebook": q.codebook.detach().clone(), "cluster_size": q.cluster_size.clone()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_kmeans_init_and_ema_identical_on_two_ranks_and_equal_to_one_process_on_all_samples(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["codebook"], r1["codebook"]) and torch.equal(r0["cluster_size"], r1["cluster_size"])
    # one process on both ranks' samples (rank order) runs the same k-means and the same EMA statistics
    single = quantizer()
    single(torch.cat([rank_points(0), rank_points(1)])[None])
    torch.testing.assert_close(r0["codebook"], single.codebook.detach(), rtol=1e-5, atol=1e-6)
    # ... which a k-means on rank 0's samples alone would not give
    alone = quantizer()
    alone(rank_points(0)[None])
    assert (alone.codebook - r0["codebook"]).abs().max() > 1e-2
