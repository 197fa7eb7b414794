"""The data section of every command (`DataConfig`) and the factory of its source (`build_dataset`).

Sources: any folder of images (`folders`), Fashion-MNIST IDX files (`fmnist`) and WebDataset tar shards (`shards`).
Every source yields ``(PIL image, label)`` (label -1 when unknown; WebDataset adds a stable sample id as a third
item); an unreadable file yields ``None`` and is dropped by `collate_skip_bad`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from ..config import ConfigError, check, opt
from .fmnist import FASHION_MNIST_ROOT, FashionMNIST, find_idx, stratified_subset
from .folders import ImageFolderDataset, has_images
from .images import IMG_EXTENSIONS
from .samples import TransformDataset
from .shards import WebDatasetShards, count_samples, expand_shards


def default_num_workers(max_workers: int = 16) -> int:
    """Loader workers for one training process: its usable CPUs shared with the other processes on the node
    (torchrun's LOCAL_WORLD_SIZE), one left for the process itself (it runs the step and collates)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(max_workers, per_process - 1))


@dataclasses.dataclass
class DataConfig:
    kind: Literal["folder", "fmnist", "wds"] = opt("folder", "image source: a folder of images (class sub-folders "
                                                   "optional), Fashion-MNIST IDX files, or WebDataset tar shards")
    path: str = opt("", "folder, IDX folder (empty: /usr/share/datasets/fashion-mnist) or shard pattern "
                        "(glob or {000..099} braces)")
    val_path: str = opt("", "separate validation source; empty: a val_fraction split of a folder, the test split "
                            "of Fashion-MNIST")
    val_fraction: float = opt(0.0, "folder only, when val_path is empty: seeded class-stratified share held out "
                                   "for validation")
    subset: float = opt(0.0, "train on a seeded class-stratified subset: 0 = all, (0, 1) = fraction, >= 1 = count")
    val_subset: float = opt(0.0, "same for the validation split")
    channels: int = opt(3, "3 = RGB, 1 = grayscale ('L'); every image mode is converted to this")
    num_workers: int | None = opt(None, "data-loader worker processes per training process; none = auto: the CPUs "
                                        "this process may use (os.sched_getaffinity) over the processes of this "
                                        "node, minus one for the main process, at most 16")
    seed: int = opt(0, "seed of splits, subsets and per-sample augmentation")
    download: bool = opt(False, "fmnist only: download with torchvision when the IDX files are missing")
    shuffle_shards: bool = opt(True, "wds only: reshuffle shard order every epoch (seeded)")
    num_samples: int = opt(0, "wds only: training samples per epoch over all processes; 0 = count them (a "
                              "sizes.json beside the shards, else a read of the tar headers)")

    def __post_init__(self) -> None:
        if self.num_workers is None:
            self.num_workers = default_num_workers()

    def validate(self, prefix: str = "data.") -> None:
        check(self.kind in ("folder", "fmnist", "wds"), f"{prefix}kind",
              f"must be 'folder', 'fmnist' or 'wds', got {self.kind!r}")
        check(self.channels in (1, 3), f"{prefix}channels", f"must be 1 or 3, got {self.channels}")
        check(self.num_workers >= 0, f"{prefix}num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.num_samples >= 0, f"{prefix}num_samples", f"must be >= 0, got {self.num_samples}")
        check(0.0 <= self.val_fraction < 1.0, f"{prefix}val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        for name in ("subset", "val_subset"):
            v = getattr(self, name)
            check(self.kind != "wds" or v == 0, f"{prefix}{name}", "streams have no subsets; for shorter epochs set "
                                                                   "data.num_samples")
            check(v >= 0 and (v < 1 or float(v).is_integer()), f"{prefix}{name}",
                  f"must be 0, a fraction in (0, 1) or a whole count >= 1, got {v}")
        for name in ("path", "val_path"):
            self._check_source(getattr(self, name), f"{prefix}{name}", required=name == "path")

    def _check_source(self, path: str, name: str, required: bool) -> None:
        if not path and not (required and self.kind == "fmnist"):
            check(not required, name, f"required for kind {self.kind!r}")
            return
        if self.kind == "folder":
            check(os.path.isdir(path), name, f"image folder not found: {path}")
            check(has_images(path), name, f"no images under {path} (looked for {', '.join(IMG_EXTENSIONS)}, in "
                                          f"sub-folders too); point --{name} at a folder of images")
        elif self.kind == "fmnist":
            root = path or FASHION_MNIST_ROOT
            found = find_idx(root, "train-images-idx3-ubyte") or find_idx(root, "t10k-images-idx3-ubyte")
            check(found is not None or self.download, name,
                  f"no Fashion-MNIST IDX files in {root} (`apt-get install dataset-fashion-mnist`, pass their folder "
                  "or set data.download true)")
        else:
            check(bool(expand_shards(path)), name, f"no WebDataset shards match {path}")


def build_dataset(cfg: DataConfig, split: Literal["train", "val"], transform: Callable | None = None) -> Any:
    """The source for ``split``; with ``transform`` it is wrapped in a `TransformDataset` giving dict samples.

    Without a transform the raw ``(PIL image, label)`` source is returned, ready for `MIMDataset` or
    `TokenizerTrainDataset`. Returns None for 'val' when there is no validation data (folder, no val_path,
    val_fraction 0).
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split: must be 'train' or 'val', got {split!r}")
    cfg.validate("data.")
    subset = cfg.subset if split == "train" else cfg.val_subset
    base: Any
    if cfg.kind == "fmnist":
        root = (cfg.val_path or cfg.path) if split == "val" else cfg.path
        base = FashionMNIST(root or None, train=split == "train", channels=cfg.channels, subset=subset, seed=cfg.seed,
                            download=cfg.download)
    elif cfg.kind == "wds":
        if split == "val" and not cfg.val_path:
            return None
        urls = expand_shards(cfg.val_path if split == "val" else cfg.path)
        num = (cfg.num_samples or count_samples(urls)) if split == "train" else 0
        base = WebDatasetShards(urls, channels=cfg.channels, shuffle_shards=cfg.shuffle_shards and split == "train",
                                seed=cfg.seed, num_samples=num)
    else:
        if split == "val" and cfg.val_path:
            base = ImageFolderDataset(cfg.val_path, channels=cfg.channels)
        else:
            base = ImageFolderDataset(cfg.path, channels=cfg.channels)
            if cfg.val_fraction > 0 and not cfg.val_path:
                held = stratified_subset(base.labels, cfg.val_fraction, cfg.seed)
                if split == "val":
                    base = base.subset(held)
                else:
                    base = base.subset(np.setdiff1d(np.arange(len(base)), held))
            elif split == "val":
                return None
        if subset > 0:
            base = base.subset(stratified_subset(base.labels, subset, cfg.seed + 1))
    if transform is None:
        return base
    return TransformDataset(base, transform, seed=cfg.seed)
