"""Image sources: any folder of images, Fashion-MNIST IDX files, and WebDataset tar shards.

Every source yields ``(PIL image, label)`` (label -1 when unknown; WebDataset adds a stable sample id as a third item).
A file that cannot be decoded is never replaced by another image (the official code silently substitutes a random
sample, facts §7.21): ``__getitem__`` returns ``None``, logs ``skipping unreadable image <path>: <reason>`` on the
"beitv2.data" logger and records ``(path, reason)`` in ``bad_files``; `collate_skip_bad` then drops it and counts it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ..config import ConfigError, check, opt
from .images import IMG_EXTENSIONS, BadFileLog, BadImageError, load_image, report_bad
from .shards import WebDatasetShards, count_samples, expand_shards

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


# ----------------------------------------------------------------------------------------------------- folders

def scan_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[str]:
    """Relative paths of all image files under ``root`` (recursive, sorted, hidden entries skipped).

    Uses ``os.scandir`` only: no file is opened, so scanning a million files costs one directory walk.
    """
    exts = tuple(e.lower() for e in extensions)
    root = os.fspath(root)
    found: list[str] = []
    stack = [""]
    seen_dirs: set[tuple[int, int]] = set()
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                entries = list(it)
        except OSError as e:
            report_bad(os.path.join(root, rel), f"cannot list directory: {e}")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                if entry.is_dir():
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen_dirs:  # symlink loops
                        seen_dirs.add((st.st_dev, st.st_ino))
                        stack.append(child)
                elif entry.name.lower().endswith(exts) and entry.is_file():
                    found.append(child)
            except OSError:
                continue
    found.sort()
    return found


class ImageFolderDataset(BadFileLog, Dataset):
    """All images under ``root``; class labels from first-level sub-folders when every image lies in one.

    Unlike torchvision's ``ImageFolder`` no class sub-folders are needed (unlabeled pre-training collections): if any
    image sits directly in ``root``, ``classes`` is empty and every label is -1.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS, channels: int = 3,
                 transform: Callable | None = None, _files: list[str] | None = None):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.channels = channels
        self.transform = transform
        self.extensions = tuple(extensions)
        files = scan_images(self.root, extensions) if _files is None else _files
        if _files is None and not files:
            raise FileNotFoundError(f"no images with extensions {', '.join(self.extensions)} under {self.root}")
        all_in_dirs = all(os.sep in f for f in files)
        self.classes: list[str] = sorted({f.split(os.sep, 1)[0] for f in files}) if all_in_dirs else []
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.files = files
        self.labels = np.array([self.class_to_idx[f.split(os.sep, 1)[0]] for f in files] if all_in_dirs
                               else [-1] * len(files), dtype=np.int64)
        self._init_bad()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A view on some of the files, keeping the class list of the whole folder."""
        sub = ImageFolderDataset.__new__(ImageFolderDataset)
        sub.__dict__.update(self.__dict__)
        sub.files = [self.files[i] for i in indices]
        sub.labels = self.labels[np.asarray(indices, dtype=np.int64)]
        sub._init_bad()
        return sub

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path = self.path(index)
        try:
            img = load_image(path, self.channels)
        except BadImageError as e:
            self._record_bad(path, str(e))
            return None
        return (self.transform(img) if self.transform else img), int(self.labels[index])


# ------------------------------------------------------------------------------------------------ Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into a numpy array, checking magic number and size."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise IDXFormatError(f"{path}: cannot read: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise IDXFormatError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
                             f"{len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: str, name: str) -> str | None:
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw")):
        for suffix in (".gz", ""):
            p = os.path.join(folder, name + suffix)
            if os.path.isfile(p):
                return p
    return None


def stratified_subset(labels: np.ndarray, subset: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified random subset: ``subset`` in (0, 1) is a fraction, >= 1 a count."""
    n = len(labels)
    if subset <= 0:
        return np.arange(n)
    count = round(subset * n) if subset < 1 else min(int(subset), n)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    per_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    share = np.array([len(ix) for ix in per_class], dtype=np.float64) * count / n
    take = np.floor(share).astype(int)
    for c in np.argsort(-(share - take), kind="stable")[: count - int(take.sum())]:  # largest remainders
        take[c] += 1
    chosen = [rng.permutation(ix)[:k] for ix, k in zip(per_class, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files; yields PIL 'L' images (or 'RGB' with ``channels=3``) and labels."""

    classes: ClassVar[list[str]] = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True, channels: int = 3,
                 subset: float = 0, seed: int = 0, download: bool = False, transform: Callable | None = None):
        self.root = os.fspath(root) if root is not None else FASHION_MNIST_ROOT
        self.train = train
        self.channels = channels
        self.transform = transform
        prefix = "train" if train else "t10k"
        img_path = _find_idx(self.root, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find_idx(self.root, f"{prefix}-labels-idx1-ubyte")
        if (img_path is None or lbl_path is None) and download:
            import torchvision

            torchvision.datasets.FashionMNIST(self.root, train=train, download=True)
            img_path = _find_idx(self.root, f"{prefix}-images-idx3-ubyte")
            lbl_path = _find_idx(self.root, f"{prefix}-labels-idx1-ubyte")
        if img_path is None or lbl_path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] not found in "
                f"{self.root}: install them with `apt-get install dataset-fashion-mnist` (to {FASHION_MNIST_ROOT}), "
                "pass the folder holding them, or ask for download=True")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IDXFormatError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise IDXFormatError(f"{lbl_path}: expected {len(images)} labels, got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise IDXFormatError(f"{lbl_path}: labels outside [0, {len(self.classes) - 1}]")
        keep = stratified_subset(labels, subset, seed)
        self.images = images[keep]
        self.labels = labels[keep].astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> FashionMNIST:
        sub = FashionMNIST.__new__(FashionMNIST)
        sub.__dict__.update(self.__dict__)
        idx = np.asarray(indices, dtype=np.int64)
        sub.images, sub.labels = self.images[idx], self.labels[idx]
        return sub

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        if self.channels == 3:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[index])


# ------------------------------------------------------------------------------------------------------ collate

def collate_skip_bad(batch: list[Any]) -> dict[str, Any]:
    """Drop ``None`` samples, collate the rest with torch's default collate and add ``num_skipped``.

    Tuple samples become ``{'image', 'label'}`` (plus ``'index'``, a stream's sample id, for 3-tuples).
    A batch made only of bad samples is ``{'num_skipped': n}``.
    """
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good)
    if not good:
        return {"num_skipped": skipped}
    if not isinstance(good[0], dict):
        good = [{"image": s[0], "label": s[1], **({"index": s[2]} if len(s) > 2 else {})} for s in good]
    out = default_collate(good)
    out["num_skipped"] = skipped
    return out



# ------------------------------------------------------------------------------------------------ config / build

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
        elif self.kind == "fmnist":
            root = path or FASHION_MNIST_ROOT
            found = _find_idx(root, "train-images-idx3-ubyte") or _find_idx(root, "t10k-images-idx3-ubyte")
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
    from .mim_dataset import TransformDataset

    return TransformDataset(base, transform, seed=cfg.seed)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "DataConfig",
    "FashionMNIST",
    "IDXFormatError",
    "ImageFolderDataset",
    "build_dataset",
    "collate_skip_bad",
    "read_idx",
    "scan_images",
    "stratified_subset",
]
