"""A `DistributedSampler` that can skip the samples already consumed in an epoch (step-granular resume).

The permutation depends only on (seed, epoch), so the same seed on every rank and the same epoch give the same
order; skipping the first ``n`` of this rank's indices replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

from collections.abc import Iterator

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
