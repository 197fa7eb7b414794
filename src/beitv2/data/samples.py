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

`TrainingData` is what the training loop is told about its data instead of asking the data set: the batch layout
(which views arrive as uint8), the epoch length of a stream, the per-epoch call and whether persistent workers may
keep their copy. Every wrapper here states it (`training_data`), and `training_data(ds)` turns anything a caller
hands the trainer into one.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from .transforms import ImageSpec


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
        # Python stack per call, a large share of a small sample's time
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass(frozen=True)
class TrainingData:
    """The training loop's contract with its data (`beitv2.engine.Trainer` reads only these fields).

    ``dataset`` is what the DataLoader iterates: map-style (a sampler picks indices) or a stream, an
    ``IterableDataset`` that is handed its share of each epoch through ``set_plan`` (`beitv2.engine.sampler.StreamPlan`)
    and whose epoch length, ``num_samples`` (over all processes), it cannot count itself. ``batch_spec`` names the
    uint8 views of a batch and how each becomes float on the device (`beitv2.data.transforms.prepare_batch`).
    ``set_epoch`` is called before each epoch's iterator is made. ``epoch_indexable``: the data set accepts
    ``(epoch, index)`` keys, so persistent workers make each epoch's samples from their own copy."""

    dataset: Dataset
    batch_spec: Mapping[str, ImageSpec] = field(default_factory=dict)
    set_epoch: Callable[[int], None] | None = None
    epoch_indexable: bool = False
    num_samples: int = 0
    set_plan: Callable[[Any], None] | None = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.dataset, IterableDataset)


class TrainingSource:
    """A data set that states its `TrainingData` itself (the wrappers here, `beitv2.data.segmentation`'s epochs)."""

    def training_data(self) -> TrainingData:
        raise NotImplementedError


def training_data(data: TrainingData | Dataset) -> TrainingData:
    """What the trainer is told about ``data``: a `TrainingData` as given, a `TrainingSource`'s own statement, or,
    for any other map-style data set, float batches without per-epoch state."""
    if isinstance(data, TrainingData):
        return data
    if isinstance(data, TrainingSource):
        return data.training_data()
    if isinstance(data, IterableDataset):
        raise TypeError(f"a streamed data set ({type(data).__name__}) needs its epoch length and plan: pass "
                        "TrainingData(stream, num_samples=..., set_plan=stream.set_plan)")
    return TrainingData(data)


class SeededDataset(TrainingSource, Dataset):
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
    def batch_spec(self) -> dict[str, ImageSpec]:
        """``{sample key: ImageSpec}`` for the views the transform returns as uint8 (`beitv2.data.transforms`): what
        `prepare_batch` applies to a batch on the device. Empty for float views."""
        specs = getattr(self.__dict__.get("transform"), "specs", None) or ()
        return {k: s for k, s in zip(self.view_keys, specs) if s is not None}

    def training_data(self) -> TrainingData:
        return TrainingData(self, self.batch_spec, self.set_epoch, self.epoch_indexable)

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
    image modeling. ``mask_index`` only when the generator's masks all hold the same count M (`exact_count`; BEiT
    v1's blockwise generator without the top-up does not): positions of different counts cannot be stacked into a
    batch, and the model then takes the boolean masks."""

    view_keys = ("image", "tokenizer_image")

    def __init__(self, base: Any, transform: Callable, mask_generator: Callable[[np.random.Generator], np.ndarray],
                 seed: int = 0):
        super().__init__(base, seed)
        self.transform = transform
        self.mask_generator = mask_generator
        self.with_index = bool(getattr(mask_generator, "exact_count", True))

    def make(self, img: Any, label: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image, tok = self.transform(img)
        mask = np.ascontiguousarray(self.mask_generator(rng)).reshape(-1).astype(bool)
        # the masked positions too (ascending): a batch of them gathers the masked tokens with a static shape
        sample = {"image": image, "tokenizer_image": tok, "mask": torch.from_numpy(mask)}
        if self.with_index:
            sample["mask_index"] = torch.from_numpy(np.flatnonzero(mask))
        return sample


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


class IterableView(TrainingSource, IterableDataset):
    """Streams a `SeededDataset` whose base is an ``IterableDataset`` (WebDataset shards, `beitv2.data.shards`): the
    stream's epoch length (``num_samples``) and `set_plan` are what the training engine needs. A stream has no
    length."""

    def __init__(self, wrapped: SeededDataset):
        self.wrapped = wrapped

    @property
    def num_samples(self) -> int:
        return int(self.wrapped.base.num_samples)

    @property
    def batch_spec(self) -> dict[str, ImageSpec]:
        return self.wrapped.batch_spec

    def set_epoch(self, epoch: int) -> None:
        self.wrapped.set_epoch(epoch)

    def set_plan(self, plan: Any) -> None:
        self.wrapped.base.set_plan(plan)

    def training_data(self) -> TrainingData:
        return TrainingData(self, self.batch_spec, self.set_epoch, num_samples=self.num_samples,
                            set_plan=self.set_plan)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for position, item in enumerate(self.wrapped.base):
            yield self.wrapped.process(item, position)


def for_loader(ds: SeededDataset) -> Dataset:
    """The object to hand to ``DataLoader``: ``ds`` itself, or an `IterableView` when its source streams."""
    return IterableView(ds) if isinstance(ds.base, IterableDataset) else ds
