"""WebDataset tar shards: a stream of ``(PIL image, label, sample_id)`` for collections too large to scan.

A stream has no length and no random access, so the training engine cannot use a sampler on it. Instead it gives the
stream a `StreamPlan` (`beitv2.engine.sampler`) per epoch: how many batches this rank must produce and how many of
them an interrupted run has already consumed. Every (rank, data-loader worker) *slot* then reads a fixed share of the
data and yields exactly its share of the planned batches (the loader takes batches from its workers in turn), cycling
over its share if the epoch is longer than the data and skipping, without decoding, the samples of the batches
already consumed. The order
is a function of (seed, epoch) only, so a resumed epoch replays the batches an uninterrupted run would have seen.

Shares: with at least as many shards as slots, slot ``g`` of ``G`` reads shards ``g, g + G, ...`` of the epoch's
(seeded) shard order; with fewer shards, every slot reads every shard and keeps the samples ``g, g + G, ...``. An
exact replay on resume needs the same number of data-loader workers (the slots).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..utils.distributed import rank_and_world
from .images import BadFileLog, BadImageError, load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
LABEL_KEYS = ("cls", "label", "cls.txt", "label.txt")
_ID_MASK = (1 << 63) - 1


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Shard list from a glob (``/data/*.tar``), a brace pattern (``shard-{000..099}.tar``) or a list of either."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    urls: list[str] = []
    for p in patterns:
        p = os.fspath(p)
        if "{" in p:
            import braceexpand

            urls.extend(braceexpand.braceexpand(p))
        elif any(c in p for c in "*?["):
            urls.extend(sorted(glob.glob(p)))
        else:
            urls.append(p)
    return urls


def _sample_key(member: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the file name."""
    folder, _, name = member.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def count_samples(urls: Sequence[str]) -> int:
    """Samples (keys with an image entry) in local shards: from a ``sizes.json`` beside them (``{shard name:
    count}``, OpenCLIP's convention) when it lists every shard, else by reading the tar headers (no decoding)."""
    total = 0
    sizes: dict[str, dict] = {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in sizes:
            f = os.path.join(folder, "sizes.json")
            sizes[folder] = json.loads(Path(f).read_text()) if os.path.isfile(f) else {}
        if name in sizes[folder]:
            total += int(sizes[folder][name])
            continue
        if not os.path.isfile(url):
            raise FileNotFoundError(f"cannot count the samples of {url} (not a local file); set data.num_samples")
        keys: set[str] = set()
        try:
            with tarfile.open(url) as tar:
                for m in tar:
                    key, ext = _sample_key(m.name)
                    if m.isfile() and ext in IMAGE_KEYS:
                        keys.add(key)
        except (tarfile.TarError, OSError):
            pass  # a broken shard counts what could be read; its samples are reported when streamed
        total += len(keys)
    return total


class WebDatasetShards(BadFileLog, IterableDataset):
    """Samples of WebDataset ``.tar`` shards (webdataset reads the tars; the split over slots is ours).

    Yields ``(PIL image, label, sample_id)``; ``sample_id`` is a stable 63-bit hash of shard name and key (a repeat
    of the data within one epoch gets a different id) that serves as the index for per-sample seeding. Without a
    plan (`set_plan`) one iteration reads this slot's share once (evaluation); under torch.distributed the rank and
    world size come from the process group. ``num_samples`` is the epoch length of a training plan (all ranks).
    """

    def __init__(self, urls: str | Sequence[str], channels: int = 3, transform: Callable | None = None,
                 shuffle_shards: bool = False, seed: int = 0, num_samples: int = 0):
        self.urls = expand_shards(urls)
        if not self.urls:
            raise FileNotFoundError(f"no WebDataset shards match {urls}")
        self.channels = channels
        self.transform = transform
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.num_samples = int(num_samples)
        self.epoch = 0
        self.plan: Any = None  # a `beitv2.engine.sampler.StreamPlan` (the data layer does not import the engine)
        self._init_bad()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_plan(self, plan: Any) -> None:
        self.plan = plan

    def _tar_error(self, exn: Exception) -> bool:
        self._record_bad(getattr(exn, "filename", None) or "<webdataset shard>", f"{type(exn).__name__}: {exn}")
        return True  # keep going with the next sample or shard

    def _slot(self, worker: int, workers: int) -> tuple[int, int]:
        """(slot, slots): this process's share of the data among ranks x data-loader workers (lanes)."""
        if self.plan is None:
            rank, world = rank_and_world()
            return rank * workers + worker, world * workers
        return self.plan.rank * workers + self.plan.lane(worker, workers), self.plan.world_size * workers

    def _raw(self, slot: int, slots: int, cycle: int) -> Iterator[dict]:
        """This slot's raw (undecoded) samples in one pass over the data, ``cycle`` numbering the passes."""
        from webdataset.tariterators import tarfile_samples

        urls = list(self.urls)
        if self.shuffle_shards:
            urls = [urls[i] for i in np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(urls))]
        if len(urls) >= slots:
            yield from tarfile_samples([{"url": u} for u in urls[slot::slots]], handler=self._tar_error)
            return
        for j, sample in enumerate(tarfile_samples([{"url": u} for u in urls], handler=self._tar_error)):
            if j % slots == slot:
                yield sample

    def _planned(self, slot: int, slots: int, skip: int, count: int) -> Iterator[tuple[int, dict]]:
        """Samples ``skip .. skip + count`` of this slot's share repeated end to end, with their pass number."""
        if count <= 0:
            return
        cycle, n = 0, 0
        while n < skip + count:
            before = n
            for sample in self._raw(slot, slots, cycle):
                if n >= skip:
                    yield cycle, sample
                n += 1
                if n == skip + count:
                    return
            if n == before:
                raise RuntimeError(f"WebDataset slot {slot} of {slots} (ranks x data-loader workers) read no samples "
                                   f"from {len(self.urls)} shard(s): give more shards or samples than slots")
            cycle += 1

    def __iter__(self) -> Iterator[tuple[Any, int, int] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self._slot(worker, workers)
        if self.plan is None:
            stream: Iterator[tuple[int, dict]] = ((0, s) for s in self._raw(slot, slots, 0))
        else:
            stream = self._planned(slot, slots, *self.plan.worker_quota(worker, workers))
        for cycle, sample in stream:
            yield self._decode(sample, cycle)

    def _decode(self, sample: dict, cycle: int) -> tuple[Any, int, int] | None:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        sample_id = (zlib.crc32(name.encode()) << 31 ^ zlib.adler32(name.encode()) ^ cycle * 0x9E3779B97F4A7C15) \
            & _ID_MASK
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            self._record_bad(name, f"no image entry (keys: {sorted(k for k in sample if not k.startswith('__'))})")
            return None
        try:
            img = load_image(sample[key], self.channels)
            label = _label(sample)
        except (BadImageError, ValueError) as e:
            self._record_bad(f"{name}.{key}", str(e))
            return None
        return (self.transform(img) if self.transform else img), label, sample_id


def _label(sample: dict) -> int:
    for k in LABEL_KEYS:
        if k in sample:
            v = sample[k]
            return int(v.decode().strip() if isinstance(v, bytes) else v)
    return -1
