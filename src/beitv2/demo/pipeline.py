"""The quickstart from its options to its report folder: the stages in order, timed, then the report."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..commands._training import maybe_print_config
from ..report.quickstart import build_report
from .configs import pretrain_config, tokenizer_config
from .plan import PLANS, resolve_data_path
from .stages import (
    StageError,
    Timer,
    build_teacher_spec,
    cpu_seconds,
    evaluate_all,
    file_kind,
    run_command,
    segmentation_stage,
)

STAGE_DIRS = ("teacher", "tokenizer", "pretrain", "random_init", "eval", "figures")


def run_quickstart(args: argparse.Namespace) -> int:
    """`beitv2 quickstart` with its parsed options; its exit status."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.fast:
        args.plan = "fast"
    args.fast = args.plan == "fast"
    plan = PLANS[args.plan]
    if getattr(args, "probe_feature", ""):
        plan = replace(plan, probe_feature=args.probe_feature)
    if getattr(args, "stand_in", ""):
        plan = replace(plan, teacher_arch=args.stand_in)
    if getattr(args, "print_config", False):  # the options and the plan's sizes, then stop
        opts = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "print_config")}
        maybe_print_config({**opts, "plan": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in asdict(plan).items()}}, args)
    progress = (not args.fast) if args.progress is None else args.progress
    t_start, c_start = time.perf_counter(), cpu_seconds()
    try:
        root = resolve_data_path(args.data_path)
    except FileNotFoundError as e:
        print(f"beitv2 quickstart: {e}", flush=True)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for d in STAGE_DIRS:  # a fresh run: the stage folders are owned by quickstart
        shutil.rmtree(out / d, ignore_errors=True)
    cfg_dir = out / "configs"
    shutil.rmtree(cfg_dir, ignore_errors=True)
    print(f"[quickstart] Fashion-MNIST from {root}; {args.plan} run, {args.threads} threads, "
          f"report in {out}", flush=True)
    timer = Timer()
    total = 5
    try:
        with timer.stage("teacher", 1, total):
            teacher_spec, teacher_dim, teacher_ckpt, teacher_desc = build_teacher_spec(args, plan, root, out,
                                                                                       cfg_dir, progress)
        with timer.stage("tokenizer (VQ-KD)", 2, total):
            tok_dir = out / "tokenizer"
            run_command("train-tokenizer", tokenizer_config(plan, root, teacher_spec, teacher_dim, tok_dir,
                                                            args.seed, progress), cfg_dir)
        with timer.stage("pre-training (BEiT v2 MIM)", 3, total):
            mim_dir = out / "pretrain"
            run_command("pretrain", pretrain_config(plan, root, tok_dir / "model.safetensors", mim_dir, args.seed,
                                                    progress), cfg_dir)
        with timer.stage("evaluation (linear probe, k-NN)", 4, total):
            results = evaluate_all(args, plan, root, out, cfg_dir, mim_dir, teacher_ckpt, progress)
    except StageError as e:
        print(f"beitv2 quickstart: {e}", flush=True)
        return 1
    with timer.stage("report", 5, total):
        metrics = build_report(out, plan, root, args, results, timer, teacher_desc, teacher_spec,
                               teacher_ckpt is not None and not args.teacher, tok_dir, mim_dir)
    if args.segment:
        segmentation_backbones = {"BEiT v2 (pre-trained)": mim_dir / "model.safetensors",
                         "random init (same ViT)": out / "random_init" / "model.safetensors"}
        if teacher_ckpt is not None and file_kind(teacher_ckpt) != "timm":  # a CNN has no ViT to segment with
            segmentation_backbones["teacher"] = teacher_ckpt
        with timer.stage("segmentation (--segment)", 6, 6):
            metrics["segmentation"] = segmentation_stage(out, root, segmentation_backbones, cfg_dir, args.seed,
                                                         args.fast, progress)
    metrics["timings_s"]["report"] = round(timer.stages["report"], 2)
    metrics["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
    metrics["cpu_s"]["report"] = round(timer.cpu["report"], 2)
    metrics["cpu_s"]["total"] = round(cpu_seconds() - c_start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[quickstart] total {metrics['timings_s']['total']:.1f} s (CPU {metrics['cpu_s']['total']:.1f} s); "
          f"report: {out / 'report.md'}", flush=True)
    for name, r in results.items():
        print(f"[quickstart] {name:>24}: linear probe {_pct(r.get('linprobe_acc1'))}, "
              f"k-NN (k=20) {_pct(r.get('knn_acc1'))}", flush=True)
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}%"
