"""Per-sample wrappers that turn ``(PIL image, label)`` sources into training samples (dicts).

Exact resume needs every random choice of a sample to be a pure function of (seed, epoch, index): the official code
draws masks from ``np.random`` inside workers, whose streams repeat across workers. Here the mask comes from
``np.random.default_rng([seed, epoch, index])``, and the transform runs with torch's CPU generator, Python's `random`
and numpy's legacy global generator all seeded from the same triple (timm's RandomResizedCrop, RandAugment and
RandomErasing draw from `random` and ``np.random``, torchvision's from torch). A sample is therefore identical
whichever worker, process or rank makes it; samples of different indices (so of different ranks at the same batch
slot) draw different operations; and the caller's three RNG states are restored afterwards.

`set_epoch` must be called before each epoch's loader iterator is created. Data-loader workers hold a copy of the
data set, so with ``persistent_workers=True`` a later `set_epoch` does not reach them; for that case a sampler may
pass ``(epoch, index)`` pairs instead of indices (`beitv2.engine.sampler.ResumableSampler` with ``with_epoch=True``,
what the trainer does with persistent workers), and the sample is made for that epoch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit torch seed derived from (seed, epoch, index)."""
    hi, lo = np.random.SeedSequence([seed, epoch, index, 0x7EED]).generate_state(2, dtype=np.uint32)
    return (int(hi) & 0x7FFFFFFF) << 32 | int(lo)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed torch's CPU generator, Python's `random` and numpy's global generator from ``seed`` for the block, then
    restore all three (a fork: the surrounding streams are untouched)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: `torch.manual_seed` also seeds every accelerator backend lazily, which records a
        # Python stack per call and used to take half of a 28 px sample's time
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Base wrapper: fetch ``base[index]``, then ``make(img, label, index, rng)`` under seeded RNGs.

    ``None`` items (unreadable files) pass through as ``None`` for `beitv2.data.collate_skip_bad` to drop.
    A base item may carry a third element, a stable sample id that replaces the position as the seeding index
    (WebDataset streams).
    """

    view_keys: tuple[str, ...] = ()  # the sample keys of the transform's outputs, in order

    def __init__(self, base: Any, seed: int = 0):
        self.base = base
        self.seed = int(seed)
        self.epoch = 0

    @property
    def batch_spec(self) -> dict[str, Any]:
        """``{sample key: ImageSpec}`` for the views the transform returns as uint8 (`beitv2.data.transforms`): what
        `prepare_batch` applies to a batch on the device. Empty for float views."""
        specs = getattr(self.__dict__.get("transform"), "specs", None) or ()
        return {k: s for k, s in zip(self.view_keys, specs) if s is not None}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def make(self, img: Any, label: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def epoch_indexable(self) -> bool:
        """Whether ``(epoch, index)`` keys fully define a sample: not for a source with its own `set_epoch`."""
        return not hasattr(self.base, "set_epoch")

    def process(self, item: Any, index: int, epoch: int | None = None) -> dict[str, Any] | None:
        if item is None:
            return None
        epoch = self.epoch if epoch is None else int(epoch)
        img, label = item[0], item[1]
        if len(item) > 2:
            index = int(item[2])
        rng = np.random.default_rng([self.seed, epoch, index])
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            out = self.make(img, int(label), index, rng)
        out.setdefault("label", torch.tensor(int(label), dtype=torch.long))
        out.setdefault("index", torch.tensor(index, dtype=torch.long))
        return out

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any] | None:
        if isinstance(index, tuple):  # (epoch, index) from a with_epoch sampler
            epoch, index = index
            return self.process(self.base[index], index, epoch)
        return self.process(self.base[index], index)

    def __getattr__(self, name: str) -> Any:
        # `bad_files`, `classes`, `labels`, ... of the wrapped source
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class MIMDataset(SeededDataset):
    """``{'image', 'tokenizer_image', 'mask' (bool [N]), 'mask_index' (long [M]), 'label', 'index'}`` for masked
    image modeling; every mask of a generator has the same count M (see `beitv2.masking`)."""

    view_keys = ("image", "tokenizer_image")

    def __init__(self, base: Any, transform: Callable, mask_generator: Callable[[np.random.Generator], np.ndarray],
                 seed: int = 0):
        super().__init__(base, seed)
        self.transform = transform
        self.mask_generator = mask_generator

    def make(self, img: Any, label: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image, tok = self.transform(img)
        mask = np.ascontiguousarray(self.mask_generator(rng)).reshape(-1).astype(bool)
        # the masked positions too (ascending): a batch of them gathers the masked tokens with a static shape
        return {"image": image, "tokenizer_image": tok, "mask": torch.from_numpy(mask),
                "mask_index": torch.from_numpy(np.flatnonzero(mask))}


class TokenizerTrainDataset(SeededDataset):
    """``{'tokenizer_image' (tokenizer size, [0, 1] once prepared), 'label', 'index'}``; the teacher sees the same
    tensor."""

    view_keys = ("tokenizer_image",)

    def __init__(self, base: Any, transform: Callable, seed: int = 0):
        super().__init__(base, seed)
        self.transform = transform

    def make(self, img: Any, label: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"tokenizer_image": self.transform(img)}


class TransformDataset(SeededDataset):
    """``{'image', 'label', 'index'}`` with any single-view transform (fine-tuning, evaluation)."""

    view_keys = ("image",)

    def __init__(self, base: Any, transform: Callable, seed: int = 0):
        super().__init__(base, seed)
        self.transform = transform

    def make(self, img: Any, label: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"image": self.transform(img)}


class IterableView(IterableDataset):
    """Streams a `SeededDataset` whose base is an ``IterableDataset`` (WebDataset shards); the stream's
    ``num_samples`` / `set_plan` (what the training engine needs, see `beitv2.data.shards`) pass through."""

    def __init__(self, wrapped: SeededDataset):
        self.wrapped = wrapped

    def set_epoch(self, epoch: int) -> None:
        self.wrapped.set_epoch(epoch)

    def set_plan(self, plan: Any) -> None:
        self.wrapped.base.set_plan(plan)

    def __getattr__(self, name: str) -> Any:
        # `num_samples`, `bad_files`, ... of the stream; never `__len__` & co (a stream has no length)
        if name == "wrapped" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for position, item in enumerate(self.wrapped.base):
            yield self.wrapped.process(item, position)


def for_loader(ds: SeededDataset) -> Dataset:
    """The object to hand to ``DataLoader``: ``ds`` itself, or an `IterableView` when its source streams."""
    return IterableView(ds) if isinstance(ds.base, IterableDataset) else ds
