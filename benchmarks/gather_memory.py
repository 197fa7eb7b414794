"""Peak host memory of gathering frozen features over ranks: `all_gather_object` (pickles) vs `gather_rows`
(tensors in chunks), measured with real gloo processes on CPU.

    PYTHONPATH=src python benchmarks/gather_memory.py --rows 400000 --dim 384 --world 2

Each rank holds rows / world features of width dim (float32) and gathers the whole set; the script prints the size
of the gathered set and each rank's peak resident memory above its state before the gather (ru_maxrss), for each
method in fresh processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(rank: int, world: int, port: int, method: str, rows: int, dim: int, out) -> None:
    from beitv2.engine import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = torch.randn(rows // world, dim)
    dist.barrier()
    before = _rss_mb()
    if method == "all_gather_object":
        parts = D.all_gather_object(local)
        full = torch.cat(parts)
        del parts
    else:
        full = D.gather_rows(local)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MiB
    assert full.shape == (rows // world * world, dim)
    out.put((method, rank, peak - before, full.numel() * 4 / 2**20))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    for method in ("all_gather_object", "gather_rows"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, a.world, port, method, a.rows, a.dim, q)) for r in range(a.world)]
        for p in procs:
            p.start()
        res = [q.get() for _ in procs]
        for p in procs:
            p.join()
        for m, r, extra, size in sorted(res, key=lambda x: x[1]):
            print(f"{m:18s} rank {r}: gathered set {size:8.1f} MiB, peak memory above the pre-gather state "
                  f"{extra:8.1f} MiB ({extra / size:.2f} x the set)")


if __name__ == "__main__":
    main()
