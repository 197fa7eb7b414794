"""Small real files shared by the CLI-level tests: Fashion-MNIST IDX files and a Hugging Face hub cache; and the
benchmark scripts as modules."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np


def write_fmnist(folder: Path, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """Gzipped IDX files in the Fashion-MNIST layout (random 28x28 images, labels cycling through 0..9)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes() + imgs.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes()
                    + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return folder


def populate_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded model repo (refs/main -> a snapshot), so
    ``HF_HUB_OFFLINE=1`` with ``HF_HUB_CACHE=cache`` serves them as if fetched from the hub. Returns the snapshot."""
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)
    return snap


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` (not a package) imported as module ``name``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
