"""SDPA kernels on this machine: flash vs math, forward only and forward + backward, over sequence lengths.

The figures behind `beitv2.models.backbone.CPU_MATH_ATTENTION_MAX_TOKENS`: on CPU the flash kernel's backward is
several times slower than the math kernel for short sequences (28 px images in 4 px patches: 50 tokens), while its
forward wins everywhere.

    python benchmarks/bench_attention.py [--threads 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, heads, tokens, head dim): the quickstart's models, a small and a base ViT at 224 px, and 384 px
SHAPES = [(256, 4, 50, 16), (128, 3, 50, 32), (64, 4, 65, 32), (32, 6, 197, 32), (16, 12, 197, 64),
          (32, 12, 197, 64), (4, 16, 577, 64)]


def time_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1000


def run(shape: tuple[int, int, int, int], backend: SDPBackend, train: bool, dtype: torch.dtype, device: str,
        repeats: int) -> float:
    q, k, v = (torch.randn(*shape, dtype=dtype, device=device, requires_grad=train) for _ in range(3))

    def step():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        if train:
            out.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return time_ms(step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {args.device}, {args.dtype}, {args.threads} threads; ms per call (lower is better)")
    print(f"{'B x H x N x D':>18} | {'pass':>5} | {'flash':>8} | {'math':>8} | flash / math")
    for shape in SHAPES:
        for train in (False, True):
            flash = run(shape, SDPBackend.FLASH_ATTENTION, train, dtype, args.device, args.repeats)
            math = run(shape, SDPBackend.MATH, train, dtype, args.device, args.repeats)
            name = " x ".join(map(str, shape))
            print(f"{name:>18} | {'train' if train else 'fwd':>5} | {flash:8.1f} | {math:8.1f} | {flash / math:.2f}")


if __name__ == "__main__":
    main()
