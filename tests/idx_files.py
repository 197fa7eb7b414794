"""Writes Fashion-MNIST-format IDX files (gzipped, as the Debian package ships them) for tests that make their own
images: the file format lives here once, each test keeps the image content its checks need."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """``<prefix>-images-idx3-ubyte.gz`` ([n, 28, 28] uint8) and ``<prefix>-labels-idx1-ubyte.gz`` ([n] uint8)."""
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())
