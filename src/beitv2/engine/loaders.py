"""The training and validation loaders: how a `TrainingData` becomes epochs of batches on the device.

A map-style data set is read through a `ResumableSampler` (each rank its share, a resumed epoch skipping what was
done); a stream (WebDataset shards) has no sampler and is told each epoch which batches to make (`StreamPlan`).
Batches arrive with uint8 views and are converted on the device (`to_device`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..data.samples import TrainingData
from ..data.transforms import ImageSpec, prepare_batch
from . import distributed as D
from .distributed import DistInfo
from .sampler import ResumableSampler, StreamPlan


def epoch_sampler(data: TrainingData, dist: DistInfo, seed: int, num_workers: int
                  ) -> tuple[ResumableSampler | None, bool, int]:
    """(the sampler, whether its loader keeps persistent workers, samples per rank and epoch).

    A stream has no sampler and must state its epoch length. Persistent workers (no worker start-up per epoch) need
    a data set that takes ``(epoch, index)`` keys, since a worker's copy never hears a later `set_epoch`."""
    if data.streamed:
        if data.num_samples <= 0:
            raise ConfigError("data.num_samples: a streamed training set needs its epoch length (samples over "
                              "all processes)")
        return None, False, data.num_samples // dist.world_size
    persistent = num_workers > 0 and data.epoch_indexable
    sampler = ResumableSampler(data.dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed,
                               drop_last=True, with_epoch=persistent)
    return sampler, persistent, len(sampler)


def start_epoch(data: TrainingData, sampler: ResumableSampler | None, dist: DistInfo, epoch: int, batch_size: int,
                used: int, first: int) -> None:
    """Point the data at ``epoch``: ``used`` micro-batches of ``batch_size`` per rank, from micro-batch ``first`` on
    (a resumed epoch skips what was done)."""
    if data.set_epoch is not None:
        data.set_epoch(epoch)
    if sampler is None:
        data.set_plan(StreamPlan(dist.rank, dist.world_size, batch_size, used, first))
    else:
        sampler.set_epoch(epoch)
        sampler.set_skip(first * batch_size)


def make_loader(dataset: Dataset, sampler: ResumableSampler | None, batch_size: int, *, drop_last: bool,
                seed: int, rank: int, device: torch.device, num_workers: int, collate_fn: Any,
                persistent: bool = False) -> DataLoader:
    # A private generator keeps the loader from drawing on the global torch RNG, so a resumed run's RNG stream
    # matches an uninterrupted one; the data's own randomness is a function of (seed, epoch, index). It is
    # seeded seed + rank (as the official code seeds each rank), so no two ranks' workers share a stream.
    gen = torch.Generator().manual_seed(seed + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=device.type == "cuda",
                      generator=gen, worker_init_fn=D.worker_ignores_stop_signals if num_workers else None,
                      persistent_workers=persistent)


def images_in(batch: dict) -> int:
    for key in ("image", "tokenizer_image"):
        if key in batch:
            return int(batch[key].shape[0])
    return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])


def to_device(batch: dict, device: torch.device, spec: dict[str, ImageSpec]) -> dict:
    """The batch on the device, its uint8 images converted there (`TrainingData.batch_spec`)."""
    return prepare_batch({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()},
                         spec)


def stop_workers(it: Any) -> None:
    """End a DataLoader iterator's worker processes now (a no-op for a loader without workers, or twice).

    A failing run must not leave this to garbage collection: the traceback keeps the iterator alive until the
    interpreter exits, and at exit multiprocessing stops the workers with SIGTERM, which they ignore
    (`distributed.worker_ignores_stop_signals`), so the process would wait for them forever. Workers that do not
    stop within the loader's own grace period (one busy in a slow read) are killed."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    finally:
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()
                w.join(timeout=5)


class DeviceBatches:
    """A loader whose batches arrive on the device and prepared, for a task's `evaluate` (its own ``.to(device)``
    is then a no-op). `close` ends the workers of the pass under way."""

    def __init__(self, loader: DataLoader, device: torch.device, spec: dict[str, ImageSpec]):
        self.loader, self.device, self.spec = loader, device, spec
        self.it: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.close()
        self.it = iter(self.loader)
        for batch in self.it:
            yield to_device(batch, self.device, self.spec)

    def close(self) -> None:
        stop_workers(self.it)
        self.it = None
