"""`beitv2 quickstart`: the whole BEiT v2 pipeline on Fashion-MNIST on a CPU, ending in a report folder.

Stages, each run in-process through the project's own commands (``beitv2.cli.main``):

1. teacher - a user-given one (``--teacher.kind hf|timm|open_clip|beitv2 --teacher.name_or_path NAME``), or, since no
   CLIP/DINO weights can be fetched offline, a *stand-in*: a small CNN (timm ``resnet10t`` at a quarter width)
   trained supervised from random init on most of the training labels (``--teacher.stand_in vit``: a small ViT);
2. tokenizer - ``beitv2 train-tokenizer``: VQ-KD distilled from the teacher on all training images;
3. pre-training - ``beitv2 pretrain``: BEiT v2 masked image modeling (blockwise masking, patch aggregation) on all
   training images;
4. evaluation - ``beitv2 linprobe`` and ``beitv2 knn`` on the test split for the pre-trained backbone, a randomly
   initialised backbone of the same shape, the teacher and the raw pixels;
5. report - ``metrics.json``, ``report.md`` and PNG figures (training curves, codebook atlas, attention maps, masks).

The full run takes about 9 minutes on 2 CPU cores with AMX; ``--fast`` runs every stage on a subset with tiny models
for the test suite (4-7 minutes on 2 CPU cores: a test of the pipeline, not of the method).
Options follow the other commands' names (``--data.path``, ``--teacher.kind``, ``--features.feature``); the older
dashed spellings (``--data-path``, ``--teacher-kind``, ...) still work. See docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

HELP = "run the whole BEiT v2 pipeline on Fashion-MNIST in minutes on a CPU and write a report"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.quickstart")

NORM = "imagenet"  # model-view normalisation of every stage (the beitv2 teacher adapter's default too)
STAGE_DIRS = ("teacher", "tokenizer", "pretrain", "random_init", "eval", "figures")


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules of one quickstart run (the 28 px images give a 7 x 7 grid of 4 px patches)."""

    train_subset: float  # images for tokenizer / pre-training: 0 = all, >= 1 = a count
    test_subset: float  # test images for evaluation and figures (0 = all)
    eval_train_subset: float  # training images the linear probe and k-NN fit on
    teacher_labels: float  # labelled training images of the stand-in teacher (fraction or count)
    teacher_val_subset: float  # test images the teacher's classifier and the tokenizer are validated on
    teacher_arch: str  # stand-in teacher: "cnn" (timm resnet10t, models/timm_net.py) or "vit" (teacher_vit)
    teacher_vit: tuple[int, int, int]  # width, depth, heads
    teacher_epochs: int
    teacher_batch: int
    teacher_lr: float
    tok_vit: tuple[int, int, int]
    tok_codes: int
    tok_code_dim: int
    tok_restart: float  # dead-code restart: re-seed codes whose EMA count per batch falls below this (0 = off)
    tok_epochs: int
    tok_batch: int
    tok_lr: float
    mim_vit: tuple[int, int, int]
    mim_early_layers: int  # patch aggregation: patch tokens of this block feed the 2-block head
    mim_epochs: int
    mim_batch: int
    mim_lr: float
    mim_crop_scale: float  # smallest RandomResizedCrop area of the pre-training view (1 = the whole image, flip only)
    mask_patches: int
    mask_min_block: int
    mask_max_block: int  # largest block (official: no limit; at 7 x 7 small blocks teach more, docs/quickstart.md)
    probe_epochs: int
    probe_batch: int
    probe_lr: float  # AdamW lr per 256 images (scaled by batch / 256)
    knn_k: tuple[int, ...]
    probe_feature: str  # what the probes read from the last block: cls+mean, or cls+grid3 (patch tokens on a 3x3 grid)
    feature_batch: int
    num_workers: int


# About 9 minutes on 2 CPU cores with AMX (measured figures: docs/quickstart.md). The tokenizer trains 937 steps per
# epoch (batch 64) for two epochs: its codes then carry more class information than the pixels, and the student is
# close to saturated on them after three MIM epochs (linear probe / k-NN end to end: 85.9 / 81.8; eight epochs: 86.8 /
# 82.9; raw pixels 82.4 / 80.5). The probes read the CLS token and the patch tokens pooled to a 3x3 grid, as the
# pixels keep their layout. No data-loader worker: on 2 cores a worker takes CPU from the step (9.9 against 8.8 MIM
# steps/s in-process).
FULL = Plan(train_subset=0, test_subset=0, eval_train_subset=5000, teacher_labels=38400, teacher_val_subset=2000,
            teacher_arch="cnn", teacher_vit=(96, 4, 3), teacher_epochs=1, teacher_batch=128, teacher_lr=3e-3,
            tok_vit=(64, 2, 4), tok_codes=256, tok_code_dim=32, tok_restart=0.0, tok_epochs=2, tok_batch=64,
            tok_lr=2e-3,
            mim_vit=(96, 4, 3), mim_early_layers=2, mim_epochs=3, mim_batch=64, mim_lr=8e-3, mim_crop_scale=1.0,
            mask_patches=20, mask_min_block=2, mask_max_block=6, probe_epochs=15, probe_batch=512, probe_lr=5e-3,
            knn_k=(10, 20), probe_feature="cls+grid3", feature_batch=1000, num_workers=0)
# Every stage on a subset with tiny models: a test of the pipeline, not of the method (minutes, not seconds: the
# stand-in teacher alone trains 5 epochs).
FAST = Plan(train_subset=1000, test_subset=400, eval_train_subset=1000, teacher_labels=500, teacher_val_subset=400,
            teacher_arch="cnn", teacher_vit=(32, 2, 2), teacher_epochs=5, teacher_batch=50, teacher_lr=4e-3,
            tok_vit=(32, 1, 2), tok_codes=64, tok_code_dim=16, tok_restart=0.0, tok_epochs=1, tok_batch=50,
            tok_lr=2e-3,
            mim_vit=(32, 2, 2), mim_early_layers=1, mim_epochs=1, mim_batch=50, mim_lr=1.5e-3, mim_crop_scale=1.0,
            mask_patches=20, mask_min_block=2, mask_max_block=6, probe_epochs=10, probe_batch=100, probe_lr=2e-2,
            knn_k=(10, 20), probe_feature="cls+grid3", feature_batch=500, num_workers=0)
# The best recipe measured, at about twice the full plan's time: eight MIM epochs instead of three (86.8 / 82.9
# against 85.9 / 81.8). Everything else is the full plan's.
LONG_MIM_EPOCHS = 8
LONG = replace(FULL, mim_epochs=LONG_MIM_EPOCHS)
PLANS = {"full": FULL, "long": LONG, "fast": FAST}
CNN_CHANNELS = (32, 48, 64, 96)  # the CNN stand-in's stage widths (timm resnet10t at quarter width); the last is its
# feature width


class StageError(RuntimeError):
    """A sub-command failed; the message names the stage and its exit status."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="report folder (its stage sub-folders are replaced)")
    parser.add_argument("--plan", choices=tuple(PLANS), default="full",
                        help="sizes and schedules: full (the demo, about 9 minutes on 2 cores with AMX), "
                             f"long (the full plan with {LONG_MIM_EPOCHS} MIM epochs instead of {FULL.mim_epochs}, "
                             "about 18 minutes: the best recipe measured) or fast (tiny models on subsets, 4-7 "
                             "minutes on 2 CPU cores: a test of the pipeline, not of the method)")
    parser.add_argument("--fast", action="store_true", help="the same as --plan fast")
    parser.add_argument("--data.path", "--data-path", dest="data_path", default="",
                        help="folder holding the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist, "
                             "else a torchvision download when online)")
    parser.add_argument("--teacher.kind", "--teacher-kind", dest="teacher_kind",
                        choices=("hf", "timm", "open_clip", "beitv2"), default="hf",
                        help="library of --teacher.name_or_path")
    parser.add_argument("--teacher.name_or_path", "--teacher", dest="teacher", default="",
                        help="a real teacher for VQ-KD: HF hub id or directory, timm or open_clip model name, or a "
                             "beitv2 vit/mim checkpoint; empty = train the stand-in teacher (--teacher.stand_in)")
    parser.add_argument("--teacher.checkpoint", "--teacher-checkpoint", dest="teacher_checkpoint", default="",
                        help="timm/open_clip: weights file for --teacher.name_or_path")
    parser.add_argument("--teacher.stand_in", "--stand-in", dest="stand_in", choices=("cnn", "vit"), default="",
                        help="architecture of the stand-in teacher trained when --teacher.name_or_path is empty "
                             "(default: the plan's, cnn: timm resnet10t at 56 px, 7x7 feature map; vit: the earlier "
                             "4-block ViT)")
    parser.add_argument("--features.feature", "--probe-feature", dest="probe_feature",
                        choices=("cls+mean", "cls+grid3"), default="",
                        help="what the linear probe and k-NN read from the last block (default: the plan's, "
                             "cls+grid3 in every plan): the CLS token and the patch tokens pooled to a 3x3 grid, which "
                             "keeps their layout as the pixels keep theirs; cls+mean: CLS and the mean patch token "
                             "(docs/quickstart.md)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--segment", action="store_true", help="also fine-tune UperNet on each backbone for "
                        "segmentation on the Fashion-MNIST composition and add the mIoU to the report (beyond the "
                        "10-minute budget; docs/segmentation.md)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on, off with --fast)")
    from ._training import add_print_config

    add_print_config(parser)


# ------------------------------------------------------------------------------------------------------ data

def resolve_data_path(path: str) -> str:
    """A folder with the Fashion-MNIST IDX files: ``path``, the Debian package's, or a torchvision download.

    Raises FileNotFoundError with instructions when none is available."""
    from ..data import FASHION_MNIST_ROOT
    from ..data.fmnist import find_idx

    def ok(root: str) -> bool:
        return all(find_idx(root, f"{s}-{k}") for s in ("train", "t10k")
                   for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))

    if path:
        if ok(path):
            return path
        raise FileNotFoundError(f"--data.path {path}: no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], "
                                "train-labels-idx1-ubyte[.gz], t10k-...) found there; `sudo apt-get install "
                                f"dataset-fashion-mnist` puts them in {FASHION_MNIST_ROOT}")
    if ok(FASHION_MNIST_ROOT):
        return FASHION_MNIST_ROOT
    cache = Path.home() / ".cache" / "beitv2" / "fashion-mnist"
    if ok(str(cache)):
        return str(cache)
    try:
        import torchvision

        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(cache), train=train, download=True)
        if ok(str(cache)):
            return str(cache)
    except Exception as e:  # offline: say how to get the data
        log.info("torchvision download failed: %s", e)
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` (files in "
        f"{FASHION_MNIST_ROOT}), or pass --data.path to a folder holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or run once online "
        f"(torchvision downloads them to {cache}).")


# --------------------------------------------------------------------------------------------------- configs

def _vit(width_depth_heads: tuple[int, int, int], **kw) -> dict[str, Any]:
    w, d, h = width_depth_heads
    return {"img_size": [28], "patch_size": 4, "in_chans": 1, "embed_dim": w, "depth": d, "num_heads": h, **kw}


def _data(root: str, subset: float, val_subset: float, plan: Plan, seed: int) -> dict[str, Any]:
    return {"kind": "fmnist", "path": root, "channels": 1, "subset": subset, "val_subset": val_subset,
            "num_workers": plan.num_workers, "seed": seed}


def _train(out: Path, epochs: int, batch: int, seed: int, progress: bool, **kw) -> dict[str, Any]:
    return {"output_dir": str(out), "epochs": epochs, "batch_size": batch, "precision": "bf16", "device": "cpu",
            "seed": seed, "progress": progress, "tensorboard": False, "keep_last": 1, "resume": "none",
            "log_every_steps": kw.pop("log_every_steps", 10), **kw}


def teacher_config(plan: Plan, root: str, init: Path, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """`beitv2 finetune` from random init on a labelled subset: light augmentation, no Mixup (short schedule)."""
    return {
        "model": {"checkpoint": str(init), "drop_path": 0.0, "rel_pos_bias": False, "head_init_scale": 1.0},
        "data": _data(root, plan.teacher_labels, plan.teacher_val_subset, plan, seed),
        "aug": {"min_crop_scale": 0.6, "rand_aug": "", "color_jitter": 0.0, "reprob": 0.0, "mixup": 0.0,
                "cutmix": 0.0, "smoothing": 0.1, "crop_pct": 1.0, "normalize": NORM},
        "optim": {"lr": plan.teacher_lr, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_epochs": 0.5,
                  "layer_decay": 1.0},
        "train": _train(out, plan.teacher_epochs, plan.teacher_batch, seed, progress,
                        eval_every_epochs=plan.teacher_epochs),
    }


def tokenizer_config(plan: Plan, root: str, teacher: dict[str, Any], teacher_dim: int, out: Path, seed: int,
                     progress: bool) -> dict[str, Any]:
    encoder = _vit(plan.tok_vit, init_values=0.0, use_abs_pos_emb=True, use_rel_pos_bias=False,
                   use_shared_rel_pos_bias=False, use_mean_pooling=True, num_classes=0, init_trunc_sigmas=100.0)
    return {
        "tokenizer": {"type": "vqkd", "vqkd": {
            "encoder": encoder, "decoder_depth": 1, "teacher_dim": teacher_dim,
            "quantizer": {"num_codes": plan.tok_codes, "code_dim": plan.tok_code_dim, "kmeans_init": True,
                          "restart_threshold": plan.tok_restart}}},
        "teacher": teacher,
        "data": _data(root, plan.train_subset, plan.teacher_val_subset, plan, seed),  # val: codebook health
        "aug": {"min_crop_scale": 0.5, "hflip": 0.5, "interpolation": "bicubic"},
        "optim": {"lr": plan.tok_lr, "lr_reference_batch": 0, "min_lr": 1e-5, "warmup_epochs": 0.1,
                  "betas": [0.9, 0.99], "weight_decay": 1e-4},
        "train": _train(out, plan.tok_epochs, plan.tok_batch, seed, progress),
    }


def mim_backbone(plan: Plan) -> dict[str, Any]:
    """The BEiT v2 pre-training ViT (shared relative position bias, layer scale 0.1, as the official recipe)."""
    return _vit(plan.mim_vit, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False,
                use_shared_rel_pos_bias=True, drop_path_rate=0.0)


def pretrain_config(plan: Plan, root: str, tokenizer: Path, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    return {
        "model": {"backbone": mim_backbone(plan), "vocab_size": plan.tok_codes, "patch_aggregation": True,
                  "early_layers": plan.mim_early_layers, "head_layers": 2, "shared_lm_head": True},
        "tokenizer": {"checkpoint": str(tokenizer)},
        "data": _data(root, plan.train_subset, plan.test_subset, plan, seed),
        "aug": {"min_crop_scale": plan.mim_crop_scale, "color_jitter": 0.0, "hflip": 0.5, "normalize": NORM},
        "mask": {"kind": "block", "num_masking_patches": plan.mask_patches, "min_num_patches": plan.mask_min_block,
                 "max_num_patches": plan.mask_max_block},
        "optim": {"lr": plan.mim_lr, "min_lr": 1e-5, "warmup_epochs": 0.1, "betas": [0.9, 0.98],
                  "weight_decay": 0.05, "clip_grad": 3.0},
        "train": _train(out, plan.mim_epochs, plan.mim_batch, seed, progress),
    }


def _features(plan: Plan, cache: Path) -> dict[str, Any]:
    # one feature definition for both protocols, so k-NN reuses the probe's cached features
    return {"feature": plan.probe_feature, "batch_size": plan.feature_batch, "cache_dir": str(cache)}


def linprobe_config(plan: Plan, root: str, checkpoint: Path, out: Path, cache: Path, seed: int, progress: bool
                    ) -> dict[str, Any]:
    return {
        "model": {"checkpoint": str(checkpoint)},
        "data": _data(root, plan.eval_train_subset, plan.test_subset, plan, seed),
        "features": _features(plan, cache),
        # BatchNorm before the head (MAE's probe): badly scaled features, e.g. an untrained network's, still get a
        # fair, well-conditioned probe within a short schedule
        "probe": {"crop_pct": 1.0, "normalize": NORM, "batchnorm": True},
        "optim": {"lr": plan.probe_lr, "min_lr": 0.0, "lr_reference_batch": 256, "weight_decay": 1e-4,
                  "warmup_epochs": 0.0},
        "train": _train(out, plan.probe_epochs, plan.probe_batch, seed, progress, log_every_steps=50,
                        eval_every_epochs=plan.probe_epochs),
    }


def knn_config(plan: Plan, root: str, checkpoint: Path, out: Path, cache: Path, seed: int, progress: bool
               ) -> dict[str, Any]:
    return {
        "model": {"checkpoint": str(checkpoint)},
        "data": _data(root, plan.eval_train_subset, plan.test_subset, plan, seed),
        "features": _features(plan, cache),
        "knn": {"k": list(plan.knn_k), "crop_pct": 1.0, "normalize": NORM},
        "run": {"output_dir": str(out), "device": "cpu", "precision": "bf16", "seed": seed, "progress": progress},
    }


# ---------------------------------------------------------------------------------------------------- stages

def run_command(name: str, cfg: dict[str, Any], cfg_dir: Path) -> None:
    """Write ``cfg`` to ``cfg_dir/<name>.yaml`` and run ``beitv2 <command> --config`` on it in-process."""
    from ..cli import main

    cfg_dir.mkdir(parents=True, exist_ok=True)
    command = name.split(".")[0]
    path = cfg_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = main([command, "--config", str(path)])
    if rc != 0:
        raise StageError(f"`beitv2 {command} --config {path}` failed with exit status {rc}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (data-loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timer:
    """Wall and CPU seconds per stage, printed as each stage ends."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, index: int, total: int):
        print(f"[quickstart] stage {index}/{total}: {name} ...", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        yield
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        self.stages[name], self.cpu[name] = dt, dc
        print(f"[quickstart] stage {index}/{total}: {name} done in {dt:.1f} s (CPU {dc:.1f} s)", flush=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _knn_at(metrics: dict, k: int) -> float | None:
    layers = metrics.get("layers", {})
    if not layers:
        return None
    last = layers[max(layers, key=int)]
    v = last.get(str(k))
    return None if v is None else float(v["acc1"])


def row_scores(plan: Plan, lp: dict, knn: dict, checkpoint: str | None) -> dict[str, Any]:
    """One row of the report's table from a linear probe's and a k-NN's metrics: the k-NN at k = 20 (DINO's) when the
    plan scores it, else its best k, and the best k beside it."""
    return {"linprobe_acc1": lp.get("acc1"), "knn_acc1": _knn_at(knn, 20) if 20 in plan.knn_k else knn.get("acc1"),
            "knn_best": {"acc1": knn.get("acc1"), "k": knn.get("best_k")}, "checkpoint": checkpoint}


def build_teacher_spec(args: argparse.Namespace, plan: Plan, root: str, out: Path, cfg_dir: Path, progress: bool
                       ) -> tuple[dict[str, Any], int, Path | None, str]:
    """(teacher section for train-tokenizer, feature width, beitv2 checkpoint to evaluate or None, description)."""
    import torch

    from ..checkpoint import save_model
    from ..models.backbone import BEiTViT, ViTConfig
    from ..teachers import TeacherConfig, build_teacher

    if args.teacher:
        spec: dict[str, Any] = {"kind": args.teacher_kind, "name_or_path": args.teacher}
        if args.teacher_checkpoint:
            spec["checkpoint"] = args.teacher_checkpoint
        if args.teacher_kind == "hf":
            spec["local_files_only"] = False
        teacher = build_teacher(TeacherConfig(**spec), (7, 7))  # fails early, naming the field, when unusable
        dim = teacher.feature_dim
        del teacher
        path = Path(args.teacher) if args.teacher_kind == "beitv2" else None
        return spec, dim, path, f"user-given {args.teacher_kind} teacher {args.teacher}"
    tdir = out / "teacher"
    tdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if plan.teacher_arch == "cnn":
        path = train_cnn_teacher(plan, root, tdir, cfg_dir, args.seed, progress)
        desc = (f"a small CNN (timm resnet10t, widths 32-96, 56 px input, output stride 8: a 7 x 7 feature map) "
                f"trained supervised from random init on {_subset_words(plan.teacher_labels)} of the training "
                f"labels ({plan.teacher_epochs} epoch{'s' if plan.teacher_epochs > 1 else ''}), because no CLIP or "
                "DINO weights can be fetched offline; "
                "VQ-KD reads its last feature map, layer-normed per patch")
        return {"kind": "beitv2", "name_or_path": str(path), "feature_norm": "layernorm"}, CNN_CHANNELS[-1], path, desc
    # no layer scale and a full-scale head: a from-scratch ViT on a few thousand labels learns faster so
    vit_cfg = ViTConfig(**_vit(plan.teacher_vit, init_values=0.0, use_abs_pos_emb=True,
                               use_shared_rel_pos_bias=False, use_mean_pooling=True))
    init = tdir / "init.safetensors"
    save_model(init, BEiTViT(vit_cfg), "vit", vit_cfg)
    run_command("finetune.teacher", teacher_config(plan, root, init, tdir, args.seed, progress), cfg_dir)
    path = tdir / "model.safetensors"
    desc = (f"a ViT (width {plan.teacher_vit[0]}, depth {plan.teacher_vit[1]}) trained "
            f"supervised from random init on {_subset_words(plan.teacher_labels)} of the training labels, because "
            "no CLIP or DINO weights can be fetched offline")
    return {"kind": "beitv2", "name_or_path": str(path)}, plan.teacher_vit[0], path, desc


def cnn_teacher_config(plan: Plan, root: str, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """The CNN stand-in's training: plain supervised cross-entropy (label smoothing 0.1), flips only, AdamW."""
    return {
        "net": {"name": "resnet10t", "num_classes": 10, "in_chans": 1, "img_size": 56,
                "model_kwargs": {"channels": list(CNN_CHANNELS), "output_stride": 8}},
        "data": _data(root, plan.teacher_labels, plan.teacher_val_subset, plan, seed),
        "optim": {"lr": plan.teacher_lr, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_epochs": 0.08},
        "train": _train(out, plan.teacher_epochs, plan.teacher_batch, seed, progress,
                        eval_every_epochs=plan.teacher_epochs),
    }


def train_cnn_teacher(plan: Plan, root: str, out: Path, cfg_dir: Path, seed: int, progress: bool) -> Path:
    """Train the CNN stand-in teacher (`beitv2.models.timm_net.TimmNet`) with the project's trainer; its config is
    ``out/config.yaml`` (the trainer writes it), not in ``cfg_dir``, whose files each rerun with one command's
    ``--config``: no command trains this teacher. Returns ``out/model.safetensors``."""
    import torch
    from torch import nn
    from torchvision.transforms import v2

    from ..config import from_dict
    from ..data import DataConfig, build_dataset, collate_skip_bad
    from ..data.samples import TransformDataset, for_loader
    from ..data.transforms import resolve_norm
    from ..engine import OptimConfig, TrainConfig, Trainer, init_distributed
    from ..eval.finetune import ClassificationTask
    from ..models.timm_net import TimmNet, TimmNetConfig

    cfg = cnn_teacher_config(plan, root, out, seed, progress)
    mean, std = resolve_norm(NORM, 1)
    net = TimmNet(from_dict(TimmNetConfig, {**cfg["net"], "mean": list(mean), "std": list(std)}))
    data = from_dict(DataConfig, cfg["data"])
    flip = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    plain = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    train_set = TransformDataset(build_dataset(data, "train"), flip, seed=seed)
    val_set = TransformDataset(build_dataset(data, "val"), plain, seed=seed)
    dist = init_distributed("cpu")
    task = ClassificationTask(net, nn.CrossEntropyLoss(label_smoothing=0.1), out_dir=out, is_main=dist.is_main)
    trainer = Trainer(task, for_loader(train_set), from_dict(TrainConfig, cfg["train"]),
                      from_dict(OptimConfig, cfg["optim"]), dist=dist, run_config=cfg, val_set=for_loader(val_set),
                      collate_fn=collate_skip_bad, num_workers=plan.num_workers)
    result = trainer.fit()
    if result.exit_code != 0:
        raise StageError(f"the CNN teacher's training ended with status {result.status}")
    from ..eval.finetune import final_report
    from ..eval.metrics import write_metrics

    write_metrics(out / "metrics.json", {"global_step": result.global_step, "num_images": len(train_set),
                                         **final_report(task, 10)})
    return out / "model.safetensors"


def _subset_words(subset: float) -> str:
    if subset <= 0:
        return "all"
    return f"{100 * subset:.0f}%" if subset < 1 else f"{int(subset)} images"


def evaluate(name: str, checkpoint: Path, plan: Plan, root: str, out: Path, cfg_dir: Path, seed: int,
             progress: bool) -> dict[str, Any]:
    """Linear probe and k-NN of one backbone; features are extracted once (shared cache)."""
    cache = out / "eval" / "features"
    lp_dir, knn_dir = out / "eval" / name / "linprobe", out / "eval" / name / "knn"
    run_command(f"linprobe.{name}", linprobe_config(plan, root, checkpoint, lp_dir, cache, seed, progress), cfg_dir)
    run_command(f"knn.{name}", knn_config(plan, root, checkpoint, knn_dir, cache, seed, progress), cfg_dir)
    lp, knn = _read_json(lp_dir / "metrics.json"), _read_json(knn_dir / "metrics.json")
    return row_scores(plan, lp, knn, str(checkpoint))


def raw_pixel_scores(root: str, train_subset: float, test_subset: float, data_seed: int, probe: dict[str, Any],
                     optim: dict[str, Any], train: dict[str, Any], ks: tuple[int, ...], knn_dir: Path,
                     encode: Any = None, source: str = "raw pixels") -> tuple[dict[str, Any], dict[str, Any]]:
    """(linear-probe metrics, k-NN metrics) on the normalised pixels (784 numbers) of a Fashion-MNIST subset, or on
    ``encode(images01) -> [B, D]`` of them (the CNN teacher's pooled features).

    ``probe`` / ``optim`` / ``train`` are the ``beitv2 linprobe`` config sections the backbones were probed with, so
    the pixels get the same probe (head, optimizer, schedule, epochs) on the same training / test subsets, and the
    same k-NN vote: the floor any learned feature has to clear. ``train.output_dir`` receives the probe's
    metrics.json, ``knn_dir`` the k-NN's.
    """
    from ..commands.knn import evaluate_knn
    from ..config import from_dict
    from ..data.fmnist import fashion_mnist_tensors
    from ..data.transforms import resolve_norm
    from ..engine import OptimConfig, TrainConfig
    from ..engine.distributed import init_distributed
    from ..eval.knn import KNNConfig
    from ..eval.linprobe import ProbeConfig, ProbeSettings, fit_probe, probe_optim_defaults, probe_train_defaults
    from ..eval.metrics import write_metrics
    from ..eval.splits import SplitFeatures

    pcfg = from_dict(ProbeConfig, probe)
    norm = resolve_norm(pcfg.normalize if pcfg.normalize != "auto" else NORM, 1)

    def features(is_train: bool, subset: float) -> tuple[Any, Any, list[str]]:
        x, y, classes = fashion_mnist_tensors(root, train=is_train, subset=subset, seed=data_seed)
        if encode is not None:
            return encode(x), y, classes
        if norm is not None:
            x = (x - norm[0][0]) / norm[1][0]
        return x.flatten(1), y, classes

    x_tr, y_tr, classes = features(True, train_subset)
    x_te, y_te, _ = features(False, test_subset)
    feats = SplitFeatures(train={0: x_tr}, train_labels=y_tr, val={0: x_te}, val_labels=y_te, class_names=classes)
    settings = ProbeSettings(pcfg, from_dict(OptimConfig, optim, base=probe_optim_defaults()),
                             from_dict(TrainConfig, train, base=probe_train_defaults()),
                             extra_metrics={"source": source})
    lp = fit_probe(feats, settings, init_distributed("cpu"))
    knn = evaluate_knn(feats, KNNConfig(k=tuple(ks))) | {"source": source}
    knn_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(knn_dir / "metrics.json", knn)
    return lp, knn


def cnn_pooled_encoder(checkpoint: Path, batch: int, feature: str = "cls+mean"):
    """``encode(images01) -> [B, F]``: the CNN teacher's last feature map, mean-pooled (timm's global pool; a CNN has
    no CLS token), computed in batches without gradients. For a grid ``feature`` (cls+grid3) the map's mean is
    followed by the map average-pooled to that grid, as the ViTs' CLS is by their patch tokens, so every row of the
    table is read the same way."""
    import torch
    import torch.nn.functional as F

    from ..checkpoint import load_model
    from ..eval.features import GRID_FEATURES

    net = load_model(checkpoint)[0].eval()
    grid = GRID_FEATURES.get(feature)

    def pool(fmap: torch.Tensor) -> torch.Tensor:
        mean = fmap.mean((2, 3))
        return torch.cat([mean, F.adaptive_avg_pool2d(fmap, grid).flatten(1)], 1) if grid else mean

    @torch.no_grad()
    def encode(images01: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(net.forward_features(images01[i:i + batch]))
                          for i in range(0, len(images01), batch)])

    return encode


def cnn_teacher_scores(plan: Plan, root: str, checkpoint: Path, out: Path, seed: int, progress: bool
                       ) -> dict[str, Any]:
    """The CNN teacher's row: the same probe and k-NN on its last feature map, pooled as the plan reads the ViTs."""
    from ..eval.features import GRID_FEATURES

    grid = GRID_FEATURES.get(plan.probe_feature)
    encode = cnn_pooled_encoder(checkpoint, plan.feature_batch, plan.probe_feature)
    lp_dir, knn_dir = out / "eval" / "teacher" / "linprobe", out / "eval" / "teacher" / "knn"
    cfg = linprobe_config(plan, root, checkpoint, lp_dir, out / "eval" / "features", seed, progress)
    lp, knn = raw_pixel_scores(root, plan.eval_train_subset, plan.test_subset, seed, cfg["probe"], cfg["optim"],
                               cfg["train"], plan.knn_k, knn_dir, encode=encode,
                               source="CNN teacher, last feature map: " + (
                                   f"mean + {grid}x{grid} grid" if grid else "mean-pooled"))
    return row_scores(plan, lp, knn, str(checkpoint))


def raw_pixel_baseline(plan: Plan, root: str, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """The raw-pixels row: the backbones' linear probe and k-NN on the normalised pixels."""
    lp_dir, knn_dir = out / "eval" / "raw_pixels" / "linprobe", out / "eval" / "raw_pixels" / "knn"
    cfg = linprobe_config(plan, root, Path("-"), lp_dir, out / "eval" / "features", seed, progress)
    lp, knn = raw_pixel_scores(root, plan.eval_train_subset, plan.test_subset, seed, cfg["probe"], cfg["optim"],
                               cfg["train"], plan.knn_k, knn_dir)
    return row_scores(plan, lp, knn, None)


def run(args: argparse.Namespace) -> int:
    import torch

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
        from dataclasses import asdict

        from ._training import maybe_print_config

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
        from ..report.quickstart import build_report

        metrics = build_report(out, plan, root, args, results, timer, teacher_desc, teacher_spec,
                               teacher_ckpt is not None and not args.teacher, tok_dir, mim_dir)
    if args.segment:
        from .segment import quickstart_stage

        seg_backbones = {"BEiT v2 (pre-trained)": mim_dir / "model.safetensors",
                         "random init (same ViT)": out / "random_init" / "model.safetensors"}
        if teacher_ckpt is not None and _file_kind(teacher_ckpt) != "timm":  # a CNN has no ViT to segment with
            seg_backbones["teacher"] = teacher_ckpt
        with timer.stage("segmentation (--segment)", 6, 6):
            metrics["segmentation"] = quickstart_stage(out, root, seg_backbones, cfg_dir, args.seed, args.fast,
                                                       progress)
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


def _file_kind(path: Path) -> str:
    from ..checkpoint import read_metadata

    return read_metadata(path).get("kind", "")


def evaluate_all(args: argparse.Namespace, plan: Plan, root: str, out: Path, cfg_dir: Path, mim_dir: Path,
                 teacher_ckpt: Path | None, progress: bool) -> dict[str, dict[str, Any]]:
    import torch

    from ..checkpoint import save_model
    from ..config import from_dict
    from ..models.backbone import BEiTViT, ViTConfig

    rdir = out / "random_init"
    rdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + 1)
    cfg = from_dict(ViTConfig, mim_backbone(plan))
    random_ckpt = rdir / "model.safetensors"
    save_model(random_ckpt, BEiTViT(cfg), "vit", cfg)  # same architecture as the pre-trained backbone, untrained
    results = {"BEiT v2 (pre-trained)": evaluate("beitv2", mim_dir / "model.safetensors", plan, root, out, cfg_dir,
                                                 args.seed, progress),
               "random init (same ViT)": evaluate("random_init", random_ckpt, plan, root, out, cfg_dir, args.seed,
                                                  progress)}
    results["raw pixels"] = raw_pixel_baseline(plan, root, out, args.seed, progress)
    if teacher_ckpt is not None and _file_kind(teacher_ckpt) == "timm":
        results["teacher"] = cnn_teacher_scores(plan, root, teacher_ckpt, out, args.seed, progress)
    elif teacher_ckpt is not None:
        results["teacher"] = evaluate("teacher", teacher_ckpt, plan, root, out, cfg_dir, args.seed, progress)
    else:
        results["teacher"] = {"linprobe_acc1": None, "knn_acc1": None,
                              "note": "external teachers are not evaluated by the quickstart"}
    return results
