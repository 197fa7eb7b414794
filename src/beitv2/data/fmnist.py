"""Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist`, or a torchvision download), and the
class-stratified subsets every source uses."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


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


def find_idx(root: str, name: str) -> str | None:
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
        img_path = find_idx(self.root, f"{prefix}-images-idx3-ubyte")
        lbl_path = find_idx(self.root, f"{prefix}-labels-idx1-ubyte")
        if (img_path is None or lbl_path is None) and download:
            import torchvision

            torchvision.datasets.FashionMNIST(self.root, train=train, download=True)
            img_path = find_idx(self.root, f"{prefix}-images-idx3-ubyte")
            lbl_path = find_idx(self.root, f"{prefix}-labels-idx1-ubyte")
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
        self.source_indices = keep  # each image's index in the IDX file (its id, whatever the subset)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> FashionMNIST:
        sub = FashionMNIST.__new__(FashionMNIST)
        sub.__dict__.update(self.__dict__)
        idx = np.asarray(indices, dtype=np.int64)
        sub.images, sub.labels = self.images[idx], self.labels[idx]
        sub.source_indices = self.source_indices[idx]
        return sub

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        if self.channels == 3:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[index])


def fashion_mnist_tensors(root: str, train: bool, subset: float, seed: int):
    """(images [N, 1, 28, 28] float in [0, 1], labels [N], class names) of a split, the same subset a `DataConfig`
    with these values selects."""
    import torch

    ds = FashionMNIST(root, train=train, channels=1, subset=subset, seed=seed)
    return torch.from_numpy(ds.images).float().div(255.0)[:, None], torch.from_numpy(ds.labels), list(ds.classes)
