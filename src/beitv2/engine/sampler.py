"""What each rank reads in an epoch, resumable at any step.

* Map-style data sets: `ResumableSampler`, a `DistributedSampler` that can skip the samples already consumed in an
  epoch. The permutation depends only on (seed, epoch), so the same seed on every rank and the same epoch give the
  same order; skipping the first ``n`` of this rank's indices replays exactly the batches an uninterrupted run sees.
* Streams (no length, no random access; `beitv2.data.shards`): a `StreamPlan` handed to ``set_plan`` every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``with_epoch=True`` yields ``(epoch, index)`` pairs: a data set that takes them (`SeededDataset`) seeds each
    sample from the epoch it is asked for, so persistent loader workers, whose copy of the data set never sees a
    later `set_epoch`, still make the right epoch's samples."""

    def __init__(self, *args, with_epoch: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.with_epoch = with_epoch

    def set_skip(self, n: int) -> None:
        """Skip this rank's first ``n`` indices in the next iteration only."""
        self.skip = max(0, int(n))

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter([(self.epoch, i) for i in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


@dataclass(frozen=True)
class StreamPlan:
    """One epoch of one rank: ``num_batches`` batches of ``batch_size`` samples, the first ``skip_batches`` of
    which were consumed before an interruption.

    Batch ``i`` of the epoch is drawn from data *lane* ``i % W`` (W data-loader workers, at least 1). The loader takes
    batches from its workers in turn starting with worker 0 at ``skip_batches``, so worker ``w`` serves lane
    ``(w + skip_batches) % W``: the resumed epoch's batches are those of the uninterrupted one (same W).
    """

    rank: int
    world_size: int
    batch_size: int
    num_batches: int
    skip_batches: int = 0

    def lane(self, worker: int, num_workers: int) -> int:
        return (worker + self.skip_batches) % num_workers

    def worker_quota(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(samples of its lane to skip, samples to yield) of one data-loader worker."""
        lane = self.lane(worker, num_workers)
        mine = len(range(lane, self.num_batches, num_workers))
        done = len(range(lane, min(self.skip_batches, self.num_batches), num_workers))
        return done * self.batch_size, (mine - done) * self.batch_size
