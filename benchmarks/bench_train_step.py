"""Throughput, peak memory and MFU of one training step, for pre-training and tokenizer training.

Pre-training step: frozen VQ-KD labels + BEiT v2 MIM model forward/backward + AdamW (`beitv2.tasks.MIMTask`).
Tokenizer step: frozen teacher features + VQ-KD forward/backward + AdamW (`beitv2.tasks.TokenizerTask`).
Both use the engine's optimizer, autocast and grad clipping, on synthetic batches (no data loading).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one full step (forward + backward, frozen parts
included); MFU = step FLOPs x steps/s / the matmul peak measured in the same run and precision (a large square
matmul). Memory: CUDA max allocated, or the process's peak RSS on CPU (monotonic over the run).

Step paths: ``default`` is what `beitv2 pretrain` / `beitv2 train-tokenizer` run (torch.compile of the model and
the frozen helpers where `beitv2.engine.trainer.resolve_compile` enables it, fused AdamW, the masked tokens gathered
by index, the last backbone and aggregation blocks computing only the rows the loss reads); ``eager`` is the baseline
kept for comparison (no compile, the unfused for-loop AdamW, and the pre-training model run by `WholeBlocksMIM`
below: every block whole, the masked tokens picked by boolean indexing); ``untrimmed`` is the default pre-training
step with `WholeBlocksMIM` picking the masked tokens by index, to measure the row-limited last blocks alone.
``--compare`` times eager and default (and any other ``--path``) side by side, interleaved, and prints the speed-ups;
the compile warm-up (first steps) is reported separately and not counted in the timed steps. The FLOPs of every path
are the eager step's (the whole model), so MFU is model FLOPs utilisation: work a path skips raises it.

    python benchmarks/bench_train_step.py --preset tiny            # CPU or GPU, fp32 and bf16
    python benchmarks/bench_train_step.py --preset tiny small base --precision bf16 --compare
    python benchmarks/bench_train_step.py --preset small --precision fp32 --compare --path untrimmed --steps-only mim
    python benchmarks/bench_train_step.py --preset base --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time

import torch
from timm.models.beit import Attention
from torch.utils.flop_counter import FlopCounterMode

from beitv2.engine import OptimConfig, build_optimizer, seed_everything
from beitv2.engine.precision import autocast, grad_scaler, resolve_precision
from beitv2.engine.trainer import COMPILE_AUTO_MIN_STEPS, compile_task, resolve_compile
from beitv2.masking import build_mask_generator
from beitv2.mim_targets import TokenTarget
from beitv2.models.architectures import get_architecture
from beitv2.models.backbone import unfuse_short_cpu_attention
from beitv2.models.mim import BEiTv2ForMIM, MaskedPatches
from beitv2.models.vqkd import VQKD
from beitv2.tasks import MIMTask, TokenizerTask
from beitv2.teachers import TimmTeacher

USE_COMPILE: bool | None = None  # the trainer's auto rule; --compile / --no-compile force it on the default path
CPU_TIME = True  # --wall-clock: time CPU runs by the wall clock instead of the process's CPU time

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
    _, mim_cfg = get_architecture(mim_name)
    _, vq_cfg = get_architecture(vq_name)
    grid = vq_cfg.encoder.grid_size
    teacher = TimmTeacher("vit_base_patch16_224", grid, model_kwargs=tkw, pretrained=False)  # FLOPs, not quality
    vq_cfg = dataclasses.replace(vq_cfg, teacher_dim=teacher.feature_dim,
                                 quantizer=dataclasses.replace(vq_cfg.quantizer, kmeans_init=False))
    mim_cfg = dataclasses.replace(mim_cfg, vocab_size=vq_cfg.quantizer.num_codes)
    return {"mim": MIMTask(BEiTv2ForMIM(mim_cfg), TokenTarget(VQKD(vq_cfg).eval())).to(device),
            "tokenizer": TokenizerTask(VQKD(vq_cfg), teacher).to(device),
            "img": mim_cfg.backbone.img_hw, "tok_img": vq_cfg.encoder.img_hw, "chans": mim_cfg.backbone.in_chans,
            "grid": mim_cfg.backbone.grid_size, "n_mask": n_mask}


def batch_for(parts: dict, bs: int, device: torch.device) -> dict:
    gen = build_mask_generator("block", parts["grid"], parts["n_mask"], min_num_patches=4)
    masks = torch.stack([torch.from_numpy(gen()).flatten() for _ in range(bs)])
    return {"image": torch.randn(bs, parts["chans"], *parts["img"], device=device),
            "tokenizer_image": torch.rand(bs, parts["chans"], *parts["tok_img"], device=device),
            "mask": masks.to(device),
            "mask_index": torch.stack([m.nonzero().flatten() for m in masks]).to(device)}  # as MIMDataset ships it


class WholeBlocksMIM(torch.nn.Module):
    """``model``'s pre-training forward with every block whole, the masked tokens picked after the blocks: by boolean
    indexing for a boolean mask (the form of the official code), by an index gather for an index. The same logits as
    `BEiTv2ForMIM.forward` up to rounding (tests/test_speed.py checks it)."""

    def __init__(self, model: BEiTv2ForMIM):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        m, cfg = self.model, self.model.config
        masked = MaskedPatches(mask, m.num_patches) if mask.dtype != torch.bool else None
        bool_mask = mask if masked is None else masked.mask

        def pick(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, 1:][bool_mask] if masked is None else masked.take(tokens[:, 1:])

        layers = (cfg.early_layers,) if cfg.patch_aggregation else ()
        x, saved = m.forward_features(images, bool_mask, m.mask_token, return_layers=layers)
        outs = [m.lm_head(m.norm(pick(x)))]
        if cfg.patch_aggregation:
            h = torch.cat([x[:, :1], saved[cfg.early_layers][:, 1:]], dim=1)
            bias = m.rel_pos_bias_for_blocks()
            for blk in m.cls_pt_layers:
                h = m.run_block(blk, h, bias)
            norm, head = (m.norm, m.lm_head) if cfg.shared_lm_head else (m.cls_pt_norm, m.cls_pt_lm_head)
            outs.append(head(norm(pick(h))))
        return outs


def make_inference(task, device: torch.device, precision: str, path: str):
    """The frozen tokenizer's `tokenize` alone (what pre-training and `beitv2 tokenize` run), no gradients."""
    fn = task.target.tokenizer.tokenize
    if path != "eager" and resolve_compile(USE_COMPILE, device, COMPILE_AUTO_MIN_STEPS):
        fn = torch.compile(fn)

    @torch.no_grad()
    def step(batch: dict) -> torch.Tensor:
        with autocast(device, precision):
            return fn(batch["tokenizer_image"]).float().mean()

    return step


def make_step(task, device: torch.device, precision: str, path: str, name: str = "mim"):
    """One optimizer step as the trainer runs it; ``path`` "eager" is the unfused, uncompiled baseline, "untrimmed"
    the default step with whole last blocks (`WholeBlocksMIM`)."""
    if name == "tokenize":
        return make_inference(task, device, precision, path)
    attns = [m for m in task.model.modules() if isinstance(m, Attention)]
    whole = isinstance(task.model, BEiTv2ForMIM) and path != "default"
    compiled = path in ("default", "untrimmed") and resolve_compile(USE_COMPILE, device, COMPILE_AUTO_MIN_STEPS)
    if path != "eager" and device.type == "cpu":
        unfuse_short_cpu_attention(task.model, compiled=compiled)  # as the Trainer does on a CPU
    fused = [m.fused_attn for m in attns]  # this path's attention form, set again before each of its steps
    for m in attns:
        m.fused_attn = True  # the eager baseline: SDPA (the math kernel for short CPU training sequences)
    opt = build_optimizer(task.model, OptimConfig(lr=1e-4, clip_grad=3.0), fused=False if path == "eager" else None)
    scaler = grad_scaler(device, precision)
    params = [p for g in opt.param_groups for p in g["params"]]
    net = WholeBlocksMIM(task.model) if whole else task.model
    if compiled:  # untrimmed is the default step with one change, so it compiles as default does
        net = compile_task(task, net, device)
        helpers = dict(task._helpers)
    else:
        helpers = {}

    def step(batch: dict) -> torch.Tensor:
        task.wrap(net, helpers)  # the paths share the task: each step sets its own wrapping and attention form
        for m, f in zip(attns, fused):
            m.fused_attn = f
        if path == "eager":
            batch = {k: v for k, v in batch.items() if k != "mask_index"}
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
    t = clock(device)
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (clock(device) - t)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def count_flops(step, batch: dict) -> float:
    with FlopCounterMode(display=False) as fc:
        step(batch)
    return fc.get_total_flops()


def clock(device: torch.device) -> float:
    """Wall time on a GPU; on a CPU this process's CPU time (all its threads), which other processes on a shared
    machine do not inflate: a CPU-s figure is what a machine with those cores to itself would reach."""
    return time.perf_counter() if device.type == "cuda" or not CPU_TIME else time.process_time()


def timed(step, batch: dict, steps: int, device: torch.device) -> float:
    sync(device)
    t = clock(device)
    for _ in range(steps):
        loss = step(batch)
    sync(device)
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss in the benchmark")
    return (clock(device) - t) / steps


def bench(name: str, task, batch: dict, device: torch.device, precision: str, paths: list[str], steps: int,
          warmup: int, rounds: int) -> list[dict]:
    """Time each path in ``paths`` on the same task and batch; with several paths, ``rounds`` interleaved rounds of
    ``steps`` steps each (the best round counts), so drifting load on a shared machine hits all paths alike."""
    task.train()
    state = {k: v.clone() for k, v in task.state_dict().items()}
    runs = {}
    for path in paths:
        task.load_state_dict(state)  # every path starts from the same weights (the quantizer's EMA moves)
        step = make_step(task, device, precision, path, name)
        t = time.perf_counter()
        for _ in range(warmup):
            step(batch)
        sync(device)
        runs[path] = {"step": step, "warmup_s": time.perf_counter() - t, "best": math.inf}
        print(f"  {name} {path} {precision}: warm-up {runs[path]['warmup_s']:.1f} s", file=sys.stderr, flush=True)
    flops = count_flops(runs["eager"]["step"] if "eager" in runs else make_step(task, device, precision, "eager", name),
                        batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(rounds):
        for path in paths:
            runs[path]["best"] = min(runs[path]["best"], timed(runs[path]["step"], batch, steps, device))
    bs = batch["image"].shape[0]
    rows = []
    for path in paths:
        dt = runs[path]["best"]
        rows.append({"step": name, "path": path, "precision": precision, "batch": bs, "images_per_s": bs / dt,
                     "ms_per_step": dt * 1e3, "warmup_s": runs[path]["warmup_s"], "gflops_per_step": flops / 1e9,
                     "achieved_tflops": flops / dt / 1e12, "peak_mem_mb": peak_memory_mb(device)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", choices=sorted(SIZES), default=["tiny"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[0],
                    help="one per preset (or one for all); 0 = a default per preset and device")
    ap.add_argument("--steps", type=int, nargs="+", default=[10], help="timed steps per round, one per preset or one")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per path (best counts)")
    ap.add_argument("--path", nargs="+", default=["default"], choices=["default", "eager", "untrimmed"],
                    help="step paths to time (see the module doc); untrimmed applies to the pre-training step only")
    ap.add_argument("--compare", action="store_true",
                    help="time eager, default and any other --path side by side; print speed-ups against eager")
    ap.add_argument("--steps-only", nargs="+", default=["mim", "tokenizer"], choices=["mim", "tokenizer", "tokenize"],
                    help="which steps to time: the pre-training step, the tokenizer-training step, the frozen "
                         "tokenizer's inference (images/s of `tokenize`)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile on the default path: --compile forces it (e.g. on a CPU, where the "
                         "trainer's auto rule stays eager), --no-compile drops it; unset = the trainer's auto rule "
                         "(compile on CUDA)")
    ap.add_argument("--wall-clock", action="store_true",
                    help="on a CPU, time by the wall clock (default: the process's CPU time, see `clock`)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args(argv)
    paths = ["eager", "default"] + [p for p in args.path if p not in ("eager", "default")] if args.compare \
        else args.path
    global USE_COMPILE, CPU_TIME
    USE_COMPILE, CPU_TIME = args.compile, not args.wall_clock
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)

    def per_preset(values: list[int], i: int) -> int:
        return values[i] if len(values) > 1 else values[0]

    rows = []
    peaks: dict[str, float] = {}
    for i, preset in enumerate(args.preset):
        # each preset compiles as a fresh run would: otherwise Dynamo, seeing the same forward again at new shapes,
        # recompiles it with dynamic shapes, and every later preset times slower generic code (ViT-B tokenizer
        # step measured 1.13x eager after tiny and small in the same process, 1.45x alone)
        torch._dynamo.reset()
        seed_everything(0)
        parts = build(preset, device)
        bs = per_preset(args.batch_size, i) or SIZES[preset][4 if device.type == "cpu" else 5]
        batch = batch_for(parts, bs, device)
        for req in args.precision:
            precision = resolve_precision(req, device)
            if precision not in peaks:
                peaks[precision] = matmul_peak(device, precision)
            peak = peaks[precision]
            for name in args.steps_only:
                task = parts["mim" if name == "tokenize" else name]
                step_paths = [p for p in paths if p != "untrimmed" or name == "mim"]
                for r in bench(name, task, batch, device, precision, step_paths, per_preset(args.steps, i),
                               args.warmup, args.rounds):
                    r.update(preset=preset, device=str(device), matmul_peak_tflops=peak / 1e12,
                             mfu=r["achieved_tflops"] * 1e12 / peak)
                    rows.append(r)
    for r in rows:
        if r["path"] != "eager":
            base = [b for b in rows if b["path"] == "eager" and all(b[k] == r[k] for k in ("preset", "step",
                                                                                          "precision"))]
            r["speedup_vs_eager"] = r["images_per_s"] / base[0]["images_per_s"] if base else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    unit = "wall clock" if device.type == "cuda" or not CPU_TIME else "process CPU time (img/s = images per CPU-s)"
    print(f"\n{' '.join(args.preset)} on {name}, torch {torch.__version__}; rounds {args.rounds}; timed by {unit}")
    hdr = f"{'preset':<7}{'step':<10}{'path':<10}{'prec':<6}{'batch':>6}{'img/s':>9}{'ms/step':>10}{'warm-up s':>10}" \
          f"{'GFLOP':>9}{'TFLOP/s':>9}{'peak TF/s':>10}{'MFU':>7}{'x eager':>8}{'peak MB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = r.get("speedup_vs_eager")
        print(f"{r['preset']:<7}{r['step']:<10}{r['path']:<10}{r['precision']:<6}{r['batch']:>6}"
              f"{r['images_per_s']:>9.1f}{r['ms_per_step']:>10.1f}{r['warmup_s']:>10.1f}{r['gflops_per_step']:>9.2f}"
              f"{r['achieved_tflops']:>9.3f}{r['matmul_peak_tflops']:>10.3f}{r['mfu']:>7.1%}"
              f"{(f'{sp:.2f}x' if sp else ''):>8}{r['peak_mem_mb']:>9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "argv": sys.argv[1:], "results": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
