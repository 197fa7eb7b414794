"""Data-pipeline figures: folder scan rate, two-view augmentation and full MIM samples per second per worker (one
process, one thread, 224 px views from 500x375 JPEG files, timed by the process's CPU time so a shared machine's
load does not lower it), and the loader workers a GPU would need.

    python benchmarks/bench_data.py [--files 20000] [--samples 200] [--gpu-images-per-s 2000]

The worker count printed last is an ESTIMATE: ``--gpu-images-per-s`` (default 2000, our guess for BEiT v2 ViT-B/16
pre-training on one H100 in bf16, from public figures: timm's ViT-B/16 training benchmarks of about 1,000 img/s on an
A100, NVIDIA's 2-3x for an H100 on transformer training, less about a third for the frozen tokenizer's forward) over
the measured per-worker rate.
"""

from __future__ import annotations

import argparse
import math
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
    ap.add_argument("--gpu-images-per-s", type=float, default=2000.0,
                    help="the GPU step rate to feed (an estimate; see the module doc)")
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
        t = time.process_time()  # CPU time: one worker's rate on a core of its own, whatever else runs beside it
        for i in range(args.samples):
            ds[i % len(ds)]
        dt = time.process_time() - t
        per_worker = args.samples / dt
        print(f"MIM sample (decode JPEG + two views + block mask): {per_worker:.1f} samples per CPU-s per worker")
        need = math.ceil(args.gpu_images_per_s / per_worker)
        print(f"workers per GPU for {args.gpu_images_per_s:.0f} img/s (ESTIMATE of ViT-B/16 pre-training on one "
              f"H100): {need} (+1 core for the training process)")


if __name__ == "__main__":
    main()
