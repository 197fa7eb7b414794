"""Throughput, peak memory and MFU of one training step, for pre-training and tokenizer training.

Pre-training step: frozen VQ-KD labels + BEiT v2 MIM model forward/backward + AdamW (`beitv2.tasks.MIMTask`).
Tokenizer step: frozen teacher features + VQ-KD forward/backward + AdamW (`beitv2.tasks.TokenizerTask`).
Both use the engine's optimizer, autocast and grad clipping, on synthetic batches (no data loading).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one full step (forward + backward, frozen parts
included); MFU = step FLOPs x steps/s / the matmul peak measured in the same run and precision (a large square
matmul). Memory: CUDA max allocated, or the process's peak RSS on CPU (monotonic over the run).

    python benchmarks/bench_train_step.py --preset tiny            # CPU or GPU, fp32 and bf16
    python benchmarks/bench_train_step.py --preset base --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from beitv2.engine import OptimConfig, build_optimizer, seed_everything
from beitv2.engine.precision import autocast, grad_scaler, resolve_precision
from beitv2.masking import build_mask_generator
from beitv2.models.mim import BEiTv2ForMIM
from beitv2.models.presets import get_preset
from beitv2.models.vqkd import VQKD
from beitv2.tasks import MIMTask, TokenizerTask
from beitv2.teachers import TimmTeacher

# (MIM preset, VQ-KD preset, teacher timm kwargs, masked patches, batch on cpu, batch on cuda)
SIZES = {
    "tiny": ("beitv2_tiny", "vqkd_tiny", dict(img_size=28, patch_size=4, embed_dim=128, depth=4, num_heads=4), 18,
             32, 256),
    "small": ("beitv2_small", "vqkd_small", dict(img_size=32, patch_size=4, embed_dim=256, depth=6, num_heads=8),
              24, 16, 256),
    "base": ("beitv2_base_patch16_224", "vqkd_encoder_base_decoder_3x768x12_clip", {}, 75, 4, 64),
}


def build(size: str, device: torch.device) -> dict:
    mim_name, vq_name, tkw, n_mask, _, _ = SIZES[size]
    _, mim_cfg = get_preset(mim_name)
    _, vq_cfg = get_preset(vq_name)
    grid = vq_cfg.encoder.grid_size
    teacher = TimmTeacher("vit_base_patch16_224", grid, model_kwargs=tkw)  # random init: FLOPs, not quality
    vq_cfg = dataclasses.replace(vq_cfg, teacher_dim=teacher.feature_dim,
                                 quantizer=dataclasses.replace(vq_cfg.quantizer, kmeans_init=False))
    mim_cfg = dataclasses.replace(mim_cfg, vocab_size=vq_cfg.quantizer.num_codes)
    return {"mim": MIMTask(BEiTv2ForMIM(mim_cfg), VQKD(vq_cfg).eval()).to(device),
            "tokenizer": TokenizerTask(VQKD(vq_cfg), teacher).to(device),
            "img": mim_cfg.backbone.img_hw, "tok_img": vq_cfg.encoder.img_hw, "chans": mim_cfg.backbone.in_chans,
            "grid": mim_cfg.backbone.grid_size, "n_mask": n_mask}


def batch_for(parts: dict, bs: int, device: torch.device) -> dict:
    gen = build_mask_generator("block", parts["grid"], parts["n_mask"], min_num_patches=4)
    masks = torch.stack([torch.from_numpy(gen()).flatten() for _ in range(bs)])
    return {"image": torch.randn(bs, parts["chans"], *parts["img"], device=device),
            "tokenizer_image": torch.rand(bs, parts["chans"], *parts["tok_img"], device=device),
            "mask": masks.to(device)}


def make_step(task, device: torch.device, precision: str):
    opt = build_optimizer(task.model, OptimConfig(lr=1e-4, clip_grad=3.0))
    scaler = grad_scaler(device, precision)
    params = [p for g in opt.param_groups for p in g["params"]]

    def step(batch: dict) -> torch.Tensor:
        with autocast(device, precision):
            loss, _ = task(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str) -> float:
    """Achieved FLOP/s of a large square matmul in this precision (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_one(name: str, task, batch: dict, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    task.train()
    step = make_step(task, device, precision)
    for _ in range(warmup):
        step(batch)
    with FlopCounterMode(display=False) as fc:
        step(batch)
    flops = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    sync(device)
    dt = (time.perf_counter() - t) / steps
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss in the benchmark")
    bs = batch["image"].shape[0]
    return {"step": name, "precision": precision, "batch": bs, "images_per_s": bs / dt, "ms_per_step": dt * 1e3,
            "gflops_per_step": flops / 1e9, "achieved_tflops": flops / dt / 1e12, "peak_mem_mb": peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--batch-size", type=int, default=0, help="0 = a default per preset and device")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    parts = build(args.preset, device)
    bs = args.batch_size or SIZES[args.preset][4 if device.type == "cpu" else 5]
    batch = batch_for(parts, bs, device)
    rows = []
    for req in args.precision:
        precision = resolve_precision(req, device)
        peak = matmul_peak(device, precision)
        for name in ("mim", "tokenizer"):
            r = bench_one(name, parts[name], batch, device, precision, args.steps, args.warmup)
            r.update(preset=args.preset, device=str(device), matmul_peak_tflops=peak / 1e12,
                     mfu=r["achieved_tflops"] * 1e12 / peak)
            rows.append(r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{args.preset} on {name}, torch {torch.__version__}")
    hdr = f"{'step':<10}{'prec':<6}{'batch':>6}{'img/s':>10}{'ms/step':>10}{'GFLOP/step':>12}{'TFLOP/s':>9}" \
          f"{'peak TF/s':>10}{'MFU':>7}{'peak MB':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['step']:<10}{r['precision']:<6}{r['batch']:>6}{r['images_per_s']:>10.1f}{r['ms_per_step']:>10.1f}"
              f"{r['gflops_per_step']:>12.2f}{r['achieved_tflops']:>9.3f}{r['matmul_peak_tflops']:>10.3f}"
              f"{r['mfu']:>7.1%}{r['peak_mem_mb']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
