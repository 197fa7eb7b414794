"""A `DistributedSampler` that can skip the samples already consumed in an epoch (step-granular resume).

The permutation depends only on (seed, epoch), so the same seed on every rank and the same epoch give the same
order; skipping the first ``n`` of this rank's indices replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_skip(self, n: int) -> None:
        """Skip this rank's first ``n`` indices in the next iteration only."""
        self.skip = max(0, int(n))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip
