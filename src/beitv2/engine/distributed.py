"""Process-group set-up for torchrun and plain SLURM ``srun``, and the rules that keep ranks from hanging.

* Launchers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under ``srun`` without
  torchrun they come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the master address from MASTER_ADDR or the
  first host of SLURM_NODELIST and the port from MASTER_PORT or the job id (`launch_env`).
* Each rank drives GPU ``LOCAL_RANK`` (modulo the GPUs it can see), whatever ``cuda:N`` was asked for
  (`select_device`).
* A failure on one rank must end the job promptly: `cleanup` called while an exception propagates prints one line
  (`failure_line`; the traceback too with ``BEITV2_TRACEBACK=1``), aborts the process group without a collective
  teardown, kills this process's data-loader workers and exits (`exit_now`), so the launcher (torchrun, srun) ends
  the other ranks instead of leaving them waiting in a collective, and a peer's collective fails at once.
* Every collective waits at most ``timeout_min`` (``--train.dist_timeout_min``), including the barriers behind
  which rank 0 does long work alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import signal
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, one_line
from ..utils.files import WriteError

log = logging.getLogger("beitv2.engine")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: str | None = None
    launcher: str = "single"  # single, torchrun or slurm


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read SLURM_NODELIST {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from torchrun's or SLURM's environment.

    torchrun wins when both are present (torchrun inside an allocation). Under SLURM the step's task count
    (SLURM_STEP_NUM_TASKS, set by srun) is preferred to the allocation's SLURM_NTASKS.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        if world > 1:
            addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST",
                                                                                                "localhost")))
            job = env.get("SLURM_JOB_ID", "")
            port = env.get("MASTER_PORT") or (str(20000 + int(job) % 20000) if job.isdigit() else "29500")
            return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), addr, port,
                             "slurm")
    return LaunchEnv()


def select_device(spec: str, local_rank: int, world_size: int, cuda_available: bool, cuda_count: int
                  ) -> tuple[str, str | None]:
    """(device, warning or None) for a requested ``--train.device``.

    ``auto`` / ``cuda`` -> GPU LOCAL_RANK (modulo the visible GPUs: a task that sees one GPU uses cuda:0). Under
    several processes ``cuda:N`` would put every rank on GPU N, so it is replaced by the local rank's GPU, with a
    warning.
    """
    if spec == "auto":
        spec = "cuda" if cuda_available else "cpu"
    if not spec.startswith("cuda"):
        return spec, None
    own = local_rank % max(cuda_count, 1)
    if spec == "cuda":
        return f"cuda:{own}", None
    if world_size > 1 and int(spec.split(":", 1)[1]) != own:
        return f"cuda:{own}", (f"device {spec} ignored under {world_size} processes (it would put every rank on "
                               f"that GPU): this rank (LOCAL_RANK {local_rank}) uses cuda:{own}")
    return spec, None


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    name, warning = select_device(spec, local_rank, world_size, torch.cuda.is_available(), torch.cuda.device_count())
    if warning:
        log.warning("%s", warning)
    return torch.device(name)


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Join the process group torchrun or srun describes (a no-op for a single process)."""
    le = launch_env()
    dev = resolve_device(device, le.local_rank, le.world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if le.world_size > 1 and not dist.is_initialized():
        if le.launcher == "slurm":  # env:// rendezvous reads these
            os.environ.setdefault("MASTER_ADDR", le.master_addr or "localhost")
            os.environ.setdefault("MASTER_PORT", le.master_port or "29500")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=le.rank,
                                world_size=le.world_size, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(le.rank, le.world_size, le.local_rank, dev)


def cleanup() -> None:
    """Leave the process group. Called while an exception propagates on a multi-rank job (a ``finally``), it
    prints this rank's error on one line, aborts the group without a collective and exits at once (exit code 1, 130
    for Ctrl-C, 2 for a configuration error; `abort_and_exit`): a collective teardown would wait for ranks that are
    themselves waiting in a training collective."""
    exc = sys.exc_info()[1]
    if not dist.is_initialized():
        return
    if exc is None or isinstance(exc, SystemExit) or dist.get_world_size() == 1:
        dist.destroy_process_group()
        return
    abort_and_exit(exc)


TRACEBACK_ENV = "BEITV2_TRACEBACK"  # set to 1: a failing command prints its traceback before the one-line summary
_WORKER_TRACEBACK = re.compile(r"^Caught (\w+) in (DataLoader worker process \d+|pin memory thread.*?)\.\s*Original "
                               r"Traceback \(most recent call last\):", re.S)


def failure_line(exc: BaseException) -> tuple[str, int]:
    """(one line, exit code) saying why a command failed: 2 for a configuration error, 128 + SIGINT for Ctrl-C (the
    second one in training, where the first asks for a checkpoint), else 1. An exception re-raised from a
    data-loader worker (whose message carries the worker's traceback) is told by the worker's last line."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {one_line(exc, 1000)}", 2
    if isinstance(exc, KeyboardInterrupt):
        return ("interrupted (Ctrl-C): stopped without saving; a training run keeps its last complete checkpoint, "
                "which --train.resume auto (the default) continues from"), 128 + signal.SIGINT
    text = str(exc)
    m = _WORKER_TRACEBACK.match(text)
    if m:
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), m.group(1))
        where = m.group(2).replace("DataLoader worker process", "data-loader worker")
        return f"failed in {where}: {one_line(Exception(last))}", 1
    if isinstance(exc, WriteError):
        return f"failed: {one_line(exc, 1000)}", 1
    return f"failed: {type(exc).__name__}: {one_line(exc)}", 1


def exit_now(line: str, code: int, exc: BaseException | None = None) -> None:
    """Print ``line`` (after ``exc``'s traceback when ``BEITV2_TRACEBACK=1``), kill this process's child processes
    (data-loader workers ignore SIGTERM, so only SIGKILL ends a busy one) and exit at once with ``code``: no atexit
    handler, non-daemon thread or process-group teardown can keep a failed process alive."""
    import multiprocessing

    for sig in (signal.SIGTERM, signal.SIGINT):  # exiting already: a launcher's SIGTERM must not cut the clean-up
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        sys.stdout.flush()
    except Exception:  # a closed or full stdout must not stop the exit
        pass
    if exc is not None and os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.stderr.write("".join(traceback.format_exception(exc)))
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()
    for child in multiprocessing.active_children():
        child.kill()
    logging.shutdown()
    os._exit(code)


def abort_and_exit(exc: BaseException) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    line, code = failure_line(exc)
    try:
        dist.distributed_c10d._abort_process_group()  # NCCL: frees the communicators without a collective
    except Exception:  # gloo has no abort; exiting closes its sockets, which fails the peers' collectives
        pass
    exit_now(f"[rank {rank}] {line}; aborting the job", code, exc)


def barrier() -> None:
    """Wait for every rank (at most the process-group timeout, ``--train.dist_timeout_min``)."""
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(t: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Concatenate every rank's ``t`` [n_r, ...] (n_r may differ) on every rank, sent as tensors in chunks.

    The result is built on ``t``'s device; the collective runs on the backend's device (CPU for gloo, the rank's GPU
    for NCCL) one chunk at a time, so the extra memory is one chunk per rank (``chunk_bytes`` each) rather than a
    pickled copy of every rank's part as with `all_gather_object`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    world, comm = dist.get_world_size(), _comm_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(x.item()) for x in sizes]
    row_bytes = max(int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size(), 1)
    rows = max(1, min(chunk_bytes // row_bytes, max(counts)))
    out = torch.empty((sum(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
    starts = np.cumsum([0] + counts).tolist()
    part = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=comm)
    parts = [torch.empty_like(part) for _ in range(world)]
    for s in range(0, max(counts), rows):
        mine = t[s:s + rows]
        part.zero_()
        part[: mine.shape[0]] = mine.to(comm)
        dist.all_gather(parts, part)
        for r in range(world):
            k = min(rows, max(counts[r] - s, 0))
            if k:
                out[starts[r] + s: starts[r] + s + k] = parts[r][:k].to(t.device)
    return out


def worker_ignores_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM / SIGINT (sent to the whole process group by a scheduler or Ctrl-C)
    are left to the main process, which stops at a step boundary all ranks agree on. A worker killed by them would
    fail the loader of one rank mid-step while the others wait in the step's collectives."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy's legacy global RNG and Python's `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def cuda_seed_for_resume(rng_state: dict, device_type: str, seed: int, rank: int, step: int) -> int | None:
    """The CUDA seed a resumed rank needs when its checkpoint has no CUDA RNG state (written on a CPU run), else None.

    Without it every rank would keep the CUDA seed the command set before building the models, the same on all
    ranks, and draw the same drop-path / Gumbel noise on every GPU.
    """
    if device_type != "cuda" or "cuda" in rng_state:
        return None
    return seed + rank + step
