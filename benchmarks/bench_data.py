"""Data-pipeline figures: folder scan rate, two-view augmentation and full MIM samples per second per worker (one
process, one thread, 224 px views from 500x375 JPEG files, timed by the process's CPU time so a shared machine's
load does not lower it), and the loader workers a GPU would need.

    python benchmarks/bench_data.py [--files 20000] [--samples 200] [--rounds 3] [--gpu-images-per-s 2000]

Three pipelines are timed side by side, in interleaved rounds (the best round of each counts): ``before``, the
views converted to float32 and normalised in the worker with the colour jitter on the full image (the pipeline
before uint8 views, and the official jitter order); ``uint8``, uint8 views with the jitter still on the full image;
and ``after``, what `beitv2 pretrain` runs now: uint8 views (converted on the device by the trainer) and the jitter
on the resized crop. A MIM sample is timed with its share of the
collate (`collate_skip_bad` over batches of ``--batch-size``), which the worker also does.

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

from beitv2.data import ImageFolderDataset, MIMDataset, TwoViewTransform, collate_skip_bad, scan_images
from beitv2.masking import build_mask_generator

PIPELINES = {"before": dict(output="float", jitter_after_crop=False),
             "uint8": dict(output="uint8", jitter_after_crop=False),  # the uint8 views alone, for the split
             "after": dict(output="uint8", jitter_after_crop=True)}


def _cpu_rate(fn, n: int) -> float:
    t = time.process_time()  # CPU time: one worker's rate on a core of its own, whatever else runs beside it
    fn(n)
    return n / max(time.process_time() - t, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pipeline; the best counts")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the collate timed with the MIM samples")
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
        imgs = [base[i][0] for i in range(len(base))]
        masks = build_mask_generator("block", (14, 14), 75)
        tfs = {name: TwoViewTransform(224, 224, **kw) for name, kw in PIPELINES.items()}
        sets = {name: MIMDataset(base, tf, masks) for name, tf in tfs.items()}

        def views(tf):
            return lambda k: [tf(imgs[i % len(imgs)]) for i in range(k)]

        def samples(ds):
            def run(k):
                for start in range(0, k, args.batch_size):
                    collate_skip_bad([ds[i % len(ds)] for i in range(start, min(k, start + args.batch_size))])
            return run

        best: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for name in PIPELINES:
                for part, fn in (("views", views(tfs[name])), ("sample", samples(sets[name]))):
                    rate = _cpu_rate(fn, args.samples)
                    best[part, name] = max(best.get((part, name), 0.0), rate)
        sample = sets["after"][0]
        nbytes = {name: sum(v.numel() * v.element_size() for k, v in sets[name][0].items()
                            if k in ("image", "tokenizer_image")) for name in PIPELINES}
        print(f"{'pipeline':<8} {'two views/CPU-s':>16} {'MIM samples/CPU-s':>18} {'view bytes/sample':>18}")
        for name in PIPELINES:
            print(f"{name:<8} {best['views', name]:>16.1f} {best['sample', name]:>18.1f} {nbytes[name]:>18,}")
        for name in ("uint8", "after"):
            print(f"{name} / before: two views {best['views', name] / best['views', 'before']:.2f}x, MIM sample "
                  f"{best['sample', name] / best['sample', 'before']:.2f}x, bytes "
                  f"{nbytes[name] / nbytes['before']:.2f}x")
        print(f"(views: {tuple(sample['image'].shape)} {sample['image'].dtype} + "
              f"{tuple(sample['tokenizer_image'].shape)})")
        per_worker = best["sample", "after"]
        need = math.ceil(args.gpu_images_per_s / per_worker)
        print(f"workers per GPU for {args.gpu_images_per_s:.0f} img/s (ESTIMATE of ViT-B/16 pre-training on one "
              f"H100): {need} (+1 core for the training process)")


if __name__ == "__main__":
    main()
