"""Data-pipeline figures: folder scan rate, two-view augmentation and full MIM samples per second (one process).

    python benchmarks/bench_data.py [--files 20000] [--samples 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beitv2.data import ImageFolderDataset, MIMDataset, TwoViewTransform, scan_images
from beitv2.masking import build_mask_generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as inside DataLoader workers (many threads on tiny tensors only add overhead)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):  # empty files: scanning must not open them
            d = root / f"class{i % 100:03d}"
            d.mkdir(exist_ok=True)
            (d / f"{i}.jpg").touch()
        t = time.perf_counter()
        n = len(scan_images(root))
        dt = time.perf_counter() - t
        print(f"scan: {n} files in {dt:.3f} s ({n / dt:,.0f} files/s)")

        img_dir = root / "imgs"
        img_dir.mkdir()
        rng = np.random.default_rng(0)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(img_dir / f"{i}.jpg")
        base = ImageFolderDataset(img_dir)
        tf = TwoViewTransform(224, 224)
        imgs = [base[i][0] for i in range(len(base))]
        t = time.perf_counter()
        for i in range(args.samples):
            tf(imgs[i % len(imgs)])
        dt = time.perf_counter() - t
        print(f"two-view transform (500x375 -> 2x224): {args.samples / dt:.1f} samples/s")
        ds = MIMDataset(base, tf, build_mask_generator("block", (14, 14), 75))
        t = time.perf_counter()
        for i in range(args.samples):
            ds[i % len(ds)]
        dt = time.perf_counter() - t
        print(f"MIM sample (decode JPEG + two views + block mask): {args.samples / dt:.1f} samples/s per process")


if __name__ == "__main__":
    main()
