"""Reproduce the BEiT v1 / v2 ablation ordering on Fashion-MNIST with one fixed budget per row.

Every row uses the same backbone (28 px, patch 4, a small ViT), the same seed, data subsets and epochs; rows differ
only in the pre-training target / head / masking. Shared stages run once per seed: the stand-in teacher (the
quickstart's small CNN, timm resnet10t at quarter width, supervised on a share of the training labels with the
recipe of `beitv2 quickstart`, since no CLIP can be downloaded here), the VQ-KD tokenizer distilled from its
layer-normed feature map, and the BEiT v1 dVAE. Pre-training uses the quickstart's MIM schedule (batch
``mim_batch``, lr ``mim_lr``). Every stage calls the `beitv2`
commands in-process (`beitv2.cli.main`), so this is also an end-to-end test of the CLI.

    python benchmarks/reproduce_fmnist.py --budget full --out results/fmnist
    python benchmarks/reproduce_fmnist.py --budget small --seeds 3 --out results/fmnist_small   # mean ± std

Rows: raw pixels (the rows' linear probe and k-NN on the normalised pixels), random init, pixel target, dVAE target
(v1), VQ-KD target without / with patch aggregation (v2), VQ-KD with random masking, teacher-feature regression,
and the teacher itself. Columns: linear-probe top-1, k-NN top-1, fine-tune top-1, tokenizer codebook usage (share of
codes used on the validation images), wall time.

Outputs under ``--out``: ``results.md`` (table, command, machine), ``results.json``, ``results.png``, rewritten after
every row. Resumable: finished stages and rows are skipped, an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

CLASSES = 10


@dataclass(frozen=True)
class Budget:
    """Everything that fixes a row's cost; identical for all rows of one run."""

    train: int  # training images (class-stratified subset) for the VQ-KD tokenizer and pre-training
    val: int  # validation images (Fashion-MNIST test split subset) for every evaluation
    width: int  # the backbone (every row) and the stand-in teacher
    depth: int
    heads: int
    early_layers: int  # l of patch aggregation
    vocab: int  # codes of the VQ-KD codebook and of the dVAE
    tok_width: int  # VQ-KD encoder (its decoder: one block)
    tok_depth: int
    tok_heads: int
    tokenizer_epochs: int
    tok_batch: int  # VQ-KD batch (the quickstart's 64: more steps per epoch distil the teacher better)
    pretrain_epochs: int
    teacher_fraction: float  # share of `train` whose labels the stand-in teacher (the quickstart's CNN) sees
    teacher_epochs: int
    teacher_batch: int
    teacher_lr: float
    finetune_train: int  # labelled images for fine-tuning
    finetune_epochs: int
    probe_train: int  # training images the linear probe and k-NN fit on
    probe_epochs: int
    probe_feature: str  # what the probes read from each block: cls+grid3 (the quickstart's) or cls+mean
    batch: int  # dVAE and fine-tuning batch
    mim_batch: int  # pre-training batch (the quickstart's: more, smaller steps beat fewer, larger ones here)
    mim_lr: float
    mask_patches: int  # of the 7 x 7 = 49 patches (official: 75 of 196, ~38%)
    mask_min_block: int  # blockwise masking's smallest and largest block (official: 16 and no limit at 14 x 14)
    mask_max_block: int | None
    crop_scale: float  # pre-training view: smallest RandomResizedCrop area (1 = the whole image, flip only)
    dvae_hidden: int  # dVAE width (its convolutions at 28 px dominate a CPU's time)
    dvae_train: int  # images the dVAE trains on (BEiT v1 took DALL-E's dVAE, trained on other data, as given)


BUDGETS = {
    # seconds on 2 CPU cores; also the smoke test (with --subset)
    "tiny": Budget(train=512, val=256, width=32, depth=2, heads=2, early_layers=1, vocab=64, tok_width=32,
                   tok_depth=1, tok_heads=2, tokenizer_epochs=1, tok_batch=128, pretrain_epochs=1,
                   teacher_fraction=0.25, teacher_epochs=2, teacher_batch=64, teacher_lr=3e-3, finetune_train=256,
                   finetune_epochs=1, probe_train=512, probe_epochs=10, probe_feature="cls+grid3", batch=64,
                   mim_batch=64, mim_lr=1.5e-3, mask_patches=18, mask_min_block=4, mask_max_block=None,
                   crop_scale=0.5, dvae_hidden=8, dvae_train=512),
    # about 20 minutes on 2 CPU cores: a quick look, too small to order the rows
    "small": Budget(train=4000, val=1500, width=64, depth=4, heads=2, early_layers=3, vocab=256, tok_width=64,
                    tok_depth=2, tok_heads=4, tokenizer_epochs=3, tok_batch=128, pretrain_epochs=2,
                    teacher_fraction=0.25, teacher_epochs=10, teacher_batch=64, teacher_lr=3e-3, finetune_train=1000,
                    finetune_epochs=4, probe_train=4000, probe_epochs=50, probe_feature="cls+grid3", batch=64,
                    mim_batch=64, mim_lr=1.5e-3, mask_patches=20, mask_min_block=4, mask_max_block=None,
                    crop_scale=0.5, dvae_hidden=16, dvae_train=4000),
    # the quickstart's scale and recipe (all 60k training images, all 10k test images; teacher on 38,400 labels,
    # 300 steps of 128; VQ-KD 2 epochs at batch 64; MIM batch 64 at lr 8e-3, blocks of 2-6 patches, whole-image
    # views, one epoch per row; probes on the 3x3 grid)
    "full": Budget(train=60000, val=10000, width=96, depth=4, heads=3, early_layers=2, vocab=256, tok_width=64,
                   tok_depth=2, tok_heads=4, tokenizer_epochs=2, tok_batch=64, pretrain_epochs=1,
                   teacher_fraction=0.64, teacher_epochs=1, teacher_batch=128, teacher_lr=3e-3, finetune_train=10000,
                   finetune_epochs=2, probe_train=10000, probe_epochs=15, probe_feature="cls+grid3", batch=128,
                   mim_batch=64, mim_lr=8e-3, mask_patches=20, mask_min_block=2, mask_max_block=6, crop_scale=1.0,
                   dvae_hidden=16, dvae_train=20000),
}


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    pretrain: dict | None  # overrides of the pre-training config; None = no pre-training
    tokenizer: str = ""  # 'vqkd' or 'dvae' (shared stage whose checkpoint the row uses)
    backbone: str = ""  # for rows without pre-training: 'random' or 'teacher'


ROWS = [
    Row("raw_pixels", "raw pixels (normalised, no network)", None, backbone="pixels"),
    Row("random", "random init (no pre-training)", None, backbone="random"),
    Row("pixels", "pixel target (norm-pix MSE), no aggregation",
        {"model": {"target": "pixels", "patch_aggregation": False}}),
    Row("dvae", "dVAE target (BEiT v1)", {"model": {"target": "tokens", "patch_aggregation": False}},
        tokenizer="dvae"),
    Row("vqkd_noagg", "VQ-KD target, no aggregation", {"model": {"target": "tokens", "patch_aggregation": False}},
        tokenizer="vqkd"),
    Row("vqkd", "VQ-KD target + patch aggregation (BEiT v2)",
        {"model": {"target": "tokens", "patch_aggregation": True}}, tokenizer="vqkd"),
    Row("vqkd_random", "BEiT v2 with random masking",
        {"model": {"target": "tokens", "patch_aggregation": True}, "mask": {"kind": "random"}}, tokenizer="vqkd"),
    Row("features", "teacher-feature regression (cosine), no aggregation",
        {"model": {"target": "features", "patch_aggregation": False}}),
    Row("teacher", "the teacher itself (the CNN supervised on labels)", None, backbone="teacher"),
]
# the order in which rows are computed: the paper's method first, so a cut-short run still has the key comparison
RUN_ORDER = ["raw_pixels", "random", "vqkd", "vqkd_noagg", "pixels", "dvae", "teacher", "vqkd_random", "features"]


# ----------------------------------------------------------------------------------------------------- helpers

def cli(argv: list[str]) -> float:
    """Run one `beitv2` command in-process; returns its wall time in seconds."""
    from beitv2.cli import main

    t = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"beitv2 {' '.join(argv)} exited with {rc}")
    return time.perf_counter() - t


def dump(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class Plan:
    """The configs of every stage, derived from one budget."""

    def __init__(self, budget: Budget, out: Path, data_path: str, device: str, workers: int, seed: int = 0):
        # the data subsets stay those of seed 0 for every seed: seeds vary initialisation, augmentation and order
        self.b, self.out, self.device, self.seed = budget, out, device, seed
        self.data = {"kind": "fmnist", "path": data_path, "channels": 1, "num_workers": workers, "seed": 0,
                     "subset": budget.train, "val_subset": budget.val}
        self.train = {"device": device, "precision": "bf16", "seed": seed, "progress": False, "tensorboard": False,
                      "batch_size": budget.batch, "log_every_steps": 20, "keep_last": 1}

    def vit(self, **kw) -> dict:
        b = self.b
        return {"img_size": [28], "patch_size": 4, "in_chans": 1, "embed_dim": b.width, "depth": b.depth,
                "num_heads": b.heads, **kw}

    def stage_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    # --- shared stages
    def random_init(self) -> Path:
        """The untrained backbone every pre-training row starts from (the MIM init, the run's seed), saved as a file."""
        path = self.stage_dir("random_init") / "model.safetensors"
        if not path.is_file():
            import torch

            from beitv2.checkpoint import save_model
            from beitv2.config import from_dict
            from beitv2.models.mim import BEiTv2ForMIM, MIMConfig

            torch.manual_seed(self.seed)
            cfg = from_dict(MIMConfig, self.mim_model({"target": "pixels", "patch_aggregation": False}))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(path, BEiTv2ForMIM(cfg), "mim", cfg)
            dump(path.parent / "config.yaml", {"aug": {"normalize": "imagenet"}})
        return path

    def quickstart_plan(self):
        """The quickstart plan whose CNN teacher recipe this budget uses (its sizes replaced by the budget's)."""
        from beitv2.demo import FULL

        b = self.b
        return replace(FULL, teacher_labels=max(CLASSES, round(b.train * b.teacher_fraction)),
                       teacher_val_subset=b.val, teacher_epochs=b.teacher_epochs, teacher_batch=b.teacher_batch,
                       teacher_lr=b.teacher_lr, num_workers=self.data["num_workers"])

    def teacher(self) -> float:
        """Train the quickstart's stand-in CNN teacher (supervised from scratch on a labelled subset drawn with the
        run's seed, as `beitv2 quickstart --seed` does); returns its wall time."""
        import torch

        from beitv2.demo import resolve_data_path, train_cnn_teacher

        t = time.perf_counter()
        torch.manual_seed(self.seed)
        out = self.stage_dir("teacher")
        train_cnn_teacher(self.quickstart_plan(), resolve_data_path(self.data["path"]), out, self.out / "configs",
                          self.seed, False)
        return time.perf_counter() - t

    @property
    def teacher_dim(self) -> int:
        """The CNN teacher's feature width (its last stage's channels)."""
        from beitv2.demo import CNN_CHANNELS

        return CNN_CHANNELS[-1]

    def teacher_spec(self, teacher: Path) -> dict:
        """The teacher section for VQ-KD and the feature-regression row: the CNN's last map, layer-normed."""
        return {"kind": "beitv2", "name_or_path": str(teacher), "bf16": True, "feature_norm": "layernorm"}

    def vqkd(self, teacher: Path) -> list[str]:
        b = self.b
        cfg = {"tokenizer": {"type": "vqkd", "vqkd": {
                   "encoder": self.vit(init_values=0.0, use_abs_pos_emb=True, use_rel_pos_bias=False,
                                       use_shared_rel_pos_bias=False, use_mean_pooling=True, num_classes=0,
                                       embed_dim=b.tok_width, depth=b.tok_depth, num_heads=b.tok_heads),
                   "decoder_depth": 1, "quantizer": {"num_codes": b.vocab, "code_dim": 32, "kmeans_init": True},
                   "teacher_dim": self.teacher_dim}},
               "teacher": self.teacher_spec(teacher),
               "data": self.data, "aug": {"min_crop_scale": 0.5},
               "optim": {"lr": 2e-3, "lr_reference_batch": 0, "min_lr": 1e-5, "warmup_epochs": 0.1,
                         "betas": [0.9, 0.99], "weight_decay": 1e-4},
               "train": {**self.train, "batch_size": b.tok_batch, "epochs": b.tokenizer_epochs,
                         "output_dir": str(self.stage_dir("vqkd")), "eval_every_epochs": b.tokenizer_epochs}}
        return ["train-tokenizer", "--config", str(dump(self.out / "configs" / "vqkd.yaml", cfg))]

    def dvae(self) -> list[str]:
        b = self.b
        steps = b.tokenizer_epochs * (b.dvae_train // b.batch)
        cfg = {"tokenizer": {"type": "dvae", "dvae": {
                   "img_size": 28, "in_chans": 1, "downsample": 4, "vocab_size": b.vocab, "code_dim": 64,
                   "hidden_dim": b.dvae_hidden, "blocks_per_group": 1, "temp_anneal_steps": max(1, int(0.8 * steps)),
                   "temp_end": 1.0 / 16, "kl_warmup_steps": max(1, steps // 4)}},
               "data": {**self.data, "subset": b.dvae_train}, "aug": {"min_crop_scale": 0.5},
               "optim": {"lr": 1e-3, "lr_reference_batch": 0, "min_lr": 1e-5, "warmup_epochs": 0.1 * b.tokenizer_epochs,
                         "weight_decay": 0.0},
               "train": {**self.train, "epochs": b.tokenizer_epochs, "output_dir": str(self.stage_dir("dvae")),
                         "eval_every_epochs": b.tokenizer_epochs}}
        return ["train-tokenizer", "--config", str(dump(self.out / "configs" / "dvae.yaml", cfg))]

    # --- rows
    def mim_model(self, over: dict) -> dict:
        b = self.b
        model = {"backbone": self.vit(init_values=0.1, drop_path_rate=0.0, use_shared_rel_pos_bias=True),
                 "vocab_size": b.vocab, "early_layers": b.early_layers, "head_layers": 2, "shared_lm_head": True}
        model.update(over)
        if model.get("target") == "features":
            model["target_dim"] = self.teacher_dim
        return model

    def pretrain(self, row: Row, tokenizer: Path | None, teacher: Path | None) -> list[str]:
        b = self.b
        over = row.pretrain or {}
        cfg = {"model": self.mim_model(over.get("model", {})),
               "data": self.data,
               "aug": {"min_crop_scale": b.crop_scale, "color_jitter": 0.0, "hflip": 0.5, "normalize": "imagenet"},
               "mask": {"kind": "block", "num_masking_patches": b.mask_patches, "min_num_patches": b.mask_min_block,
                        "max_num_patches": b.mask_max_block, **over.get("mask", {})},
               "optim": {"lr": b.mim_lr, "min_lr": 1e-5, "warmup_epochs": 0.1 * b.pretrain_epochs,
                         "betas": [0.9, 0.98], "weight_decay": 0.05, "clip_grad": 3.0},
               "train": {**self.train, "epochs": b.pretrain_epochs, "batch_size": b.mim_batch,
                         "output_dir": str(self.stage_dir(f"pretrain_{row.name}"))}}
        if tokenizer is not None:
            cfg["tokenizer"] = {"checkpoint": str(tokenizer)}
        if teacher is not None:
            cfg["teacher"] = self.teacher_spec(teacher)
        return ["pretrain", "--config", str(dump(self.out / "configs" / f"pretrain_{row.name}.yaml", cfg))]

    def features(self, cache: Path) -> dict:
        return {"feature": self.b.probe_feature, "layers": list(range(1, self.b.depth + 1)), "cache_dir": str(cache)}

    def linprobe_config(self, ckpt: str, out: Path) -> dict:
        return {"model": {"checkpoint": ckpt}, "data": {**self.data, "subset": self.b.probe_train},
                "features": self.features(out.parent / "features"),
                "probe": {"crop_pct": 1.0, "normalize": "imagenet"},
                "train": {**self.train, "batch_size": 256, "epochs": self.b.probe_epochs, "output_dir": str(out)}}

    def linprobe_argv(self, ckpt: str, out: Path) -> list[str]:
        return ["linprobe", "--config", str(dump(out.parent / "linprobe.yaml", self.linprobe_config(ckpt, out)))]

    def knn_argv(self, ckpt: str, out: Path) -> list[str]:
        cfg = {"model": {"checkpoint": ckpt}, "data": {**self.data, "subset": self.b.probe_train},
               "features": self.features(out.parent / "features"),
               "knn": {"k": [20], "crop_pct": 1.0, "normalize": "imagenet"},
               "run": {"output_dir": str(out), "device": self.device, "precision": "bf16", "progress": False}}
        return ["knn", "--config", str(dump(out.parent / "knn.yaml", cfg))]

    def finetune_argv(self, ckpt: str, out: Path, n_train: int, epochs: int, lr: float = 2e-3,
                      layer_decay: float = 0.75, min_crop_scale: float = 0.5, batch: int = 0,
                      model: dict | None = None) -> list[str]:
        """A small-data recipe (no Mixup/CutMix/RandAugment, which hurt at a few epochs), identical for all rows."""
        cfg = {"model": {"checkpoint": ckpt, "drop_path": 0.1, **(model or {})},
               "data": {**self.data, "subset": n_train},
               "aug": {"min_crop_scale": min_crop_scale, "rand_aug": "", "color_jitter": 0.0, "reprob": 0.0,
                       "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1, "crop_pct": 1.0, "normalize": "imagenet"},
               "optim": {"lr": lr, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_epochs": 0.1 * epochs,
                         "layer_decay": layer_decay},
               "train": {**self.train, "batch_size": batch or self.b.batch, "epochs": epochs, "output_dir": str(out),
                         "eval_every_epochs": epochs}}
        return ["finetune", "--config", str(dump(out.parent / f"{out.name}.yaml", cfg))]


def codebook_usage(tokenizer: Path, plan: Plan) -> dict[str, float]:
    """Share of the codebook the tokenizer uses on the validation images, and the code perplexity."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from beitv2.checkpoint import load_model
    from beitv2.config import from_dict
    from beitv2.data import DataConfig, build_dataset

    model, _, _ = load_model(tokenizer)
    data = from_dict(DataConfig, {**plan.data, "num_workers": 0})
    ds = build_dataset(data, "val")
    counts = torch.zeros(model.vocab_size, dtype=torch.long)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            with torch.no_grad():
                codes = model.tokenize(torch.stack(batch))
            counts.add_(torch.bincount(codes.flatten(), minlength=model.vocab_size))
            batch.clear()

    size = model.img_size
    size = [size, size] if isinstance(size, int) else list(size)
    for i in range(len(ds)):
        t = TF.to_dtype(TF.to_image(ds[i][0]), torch.float32, scale=True)
        batch.append(TF.resize(t, size, antialias=True) if list(t.shape[-2:]) != size else t)
        if len(batch) == 256:
            flush()
    flush()
    p = counts.float() / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return {"usage": float((counts > 0).float().mean()), "codes_used": int((counts > 0).sum()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum())), "vocab": int(model.vocab_size)}


def evaluate_pixels(plan: Plan, row_dir: Path) -> tuple[dict[str, Any], float]:
    """The raw-pixels row: the rows' linear probe and k-NN on the 784 normalised pixels (nothing to fine-tune)."""
    from beitv2.demo import raw_pixel_scores, resolve_data_path

    t = time.perf_counter()
    cfg = plan.linprobe_config("-", row_dir / "linprobe")
    lp, kn = raw_pixel_scores(resolve_data_path(plan.data["path"]), plan.b.probe_train, plan.b.val,
                              plan.data["seed"], cfg["probe"], cfg.get("optim", {}), cfg["train"], (20,),
                              row_dir / "knn")
    return {"linprobe_top1": lp["acc1"], "linprobe_block": 0, "knn_top1": kn["acc1"], "knn_block": 0,
            "finetune_top1": None}, time.perf_counter() - t


def evaluate_cnn_teacher(plan: Plan, ckpt: Path, row_dir: Path) -> tuple[dict[str, Any], float]:
    """The teacher row: the rows' linear probe and k-NN on the CNN's last feature map, read as the ViTs are (the map's
    mean in place of a CLS token, then its 3x3 pooling for the grid reading; a CNN has no ViT blocks to fine-tune with
    layer decay, so no fine-tune column)."""
    from beitv2.demo import cnn_pooled_encoder, raw_pixel_scores, resolve_data_path

    t = time.perf_counter()
    encode = cnn_pooled_encoder(ckpt, 1000, plan.b.probe_feature)
    cfg = plan.linprobe_config("-", row_dir / "linprobe")
    lp, kn = raw_pixel_scores(resolve_data_path(plan.data["path"]), plan.b.probe_train, plan.b.val,
                              plan.data["seed"], cfg["probe"], cfg.get("optim", {}), cfg["train"], (20,),
                              row_dir / "knn", encode=encode,
                              source=f"CNN teacher, last feature map read as {plan.b.probe_feature}")
    return {"linprobe_top1": lp["acc1"], "linprobe_block": 0, "knn_top1": kn["acc1"], "knn_block": 0,
            "finetune_top1": None}, time.perf_counter() - t


def evaluate(plan: Plan, ckpt: str, row_dir: Path) -> tuple[dict[str, float], float]:
    t = cli(plan.linprobe_argv(ckpt, row_dir / "linprobe"))
    t += cli(plan.knn_argv(ckpt, row_dir / "knn"))
    t += cli(plan.finetune_argv(ckpt, row_dir / "finetune", plan.b.finetune_train, plan.b.finetune_epochs))
    lp = read_json(row_dir / "linprobe" / "metrics.json")
    kn = read_json(row_dir / "knn" / "metrics.json")
    ft = read_json(row_dir / "finetune" / "metrics.json")
    return {"linprobe_top1": lp["acc1"], "linprobe_block": lp.get("best_layer"), "knn_top1": kn["acc1"],
            "knn_block": kn.get("best_layer"), "finetune_top1": ft["acc1"]}, t


# ----------------------------------------------------------------------------------------------------- reports

def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(v: Any, std: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if std is None else f"{v:.1f} ± {std:.1f}"


def render(out: Path, state: dict) -> None:
    """results.json, results.md and results.png from the finished rows (called after every row)."""
    write_json(out / "results.json", state)
    rows = state["rows"]
    lines = [f"# BEiT ablations on Fashion-MNIST, budget `{state['budget_name']}`", "",
             f"Command: `{state['command']}`", "",
             "| row | linear probe top-1 | k-NN top-1 | fine-tune top-1 | codebook usage | wall time (min) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in ROWS:
        res = rows.get(r.name)
        if res is None:
            lines.append(f"| {r.label} | not run | | | | |")
            continue
        usage = res.get("codebook")
        u = f"{100 * usage['usage']:.0f}% ({usage['codes_used']}/{usage['vocab']})" if usage else "–"
        cells = [_fmt(res[k], res.get(k + "_std")) for k in ("linprobe_top1", "knn_top1", "finetune_top1")]
        lines.append(f"| {r.label} | {' | '.join(cells)} | {u} | {res['wall_s'] / 60:.1f} |")
    if state.get("seeds"):
        lines += ["", f"Mean ± standard deviation over seeds {state['seeds']} (each seed: its own teacher, tokenizers, "
                      "pre-training and evaluations on the same data subsets; per-seed tables in seed*/results.md); "
                      "wall time is the mean per seed."]
    b = state["budget"]
    shared = ", ".join(f"{k} {v / 60:.1f} min" for k, v in state["shared_wall_s"].items())
    lines += ["", f"Wall time = the row's own pre-training + linear probe + k-NN + fine-tuning. Shared stages (not in "
                  f"the rows): {shared or 'none yet'}. Teacher top-1 accuracy on the validation subset: "
                  f"{_fmt(state.get('teacher_top1'))}.", "",
              f"Budget: {json.dumps(b)}", "",
              f"Machine: {json.dumps(state['machine'])}; started {state['started']}, updated {state['updated']}.", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(out / "results.png", state)


def plot(path: Path, state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r for r in ROWS if r.name in state["rows"]]
    metrics = [("linprobe_top1", "linear probe"), ("knn_top1", "k-NN"), ("finetune_top1", "fine-tune")]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    w = 0.27
    for i, (key, label) in enumerate(metrics):
        vals = [state["rows"][r.name][key] or 0.0 for r in names]
        err = [state["rows"][r.name].get(key + "_std") or 0.0 for r in names]
        bars = ax.bar(x + (i - 1) * w, vals, w, yerr=err, capsize=2, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [r.name for r in names], rotation=20)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Fashion-MNIST, budget {state['budget_name']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    ap.add_argument("--out", default="results/fmnist", help="results folder (resumes what it finds there)")
    ap.add_argument("--data-path", default="", help="folder of the Fashion-MNIST IDX files (empty: the system copy)")
    ap.add_argument("--subset", type=int, default=0,
                    help="smoke mode: cap the training images at N (val N/2, fine-tune N/2); changes the budget")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all); " +
                    ", ".join(r.name for r in ROWS))
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers per stage")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run every row with seeds 0..N-1 (each seed in OUT/seed<i>/, its own teacher and tokenizers) "
                         "and report mean ± std in OUT/results.md; 1 = one seed (0) directly in OUT")
    ap.add_argument("--only-seed", type=int, default=None, metavar="S",
                    help="with --seeds N: run seed S alone (OUT/seed<S>/), e.g. one seed per machine or process; a "
                         "later run without it skips the finished rows and writes the mean ± std")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds: must be >= 1")
    if args.only_seed is not None and not (args.seeds > 1 and 0 <= args.only_seed < args.seeds):
        ap.error(f"--only-seed: must be in 0..{args.seeds - 1} with --seeds > 1 (got {args.only_seed}, --seeds "
                 f"{args.seeds})")
    return args


METRICS = ("linprobe_top1", "knn_top1", "finetune_top1", "pretrain_s", "eval_s", "wall_s")


def aggregate(states: list[dict], seeds: list[int]) -> dict:
    """One state whose rows hold the mean and sample std over ``states`` (rows missing in a seed are left out)."""
    import statistics

    first = states[0]
    agg: dict[str, Any] = {k: first[k] for k in ("budget_name", "budget", "command", "machine", "started")}
    agg.update(seeds=seeds, updated=max(s["updated"] for s in states), rows={}, per_seed=[s["rows"] for s in states])
    names = [r.name for r in ROWS if any(r.name in s["rows"] for s in states)]
    for name in names:
        done = [s["rows"][name] for s in states if name in s["rows"]]
        row: dict[str, Any] = {"n_seeds": len(done)}
        for k in METRICS:
            vals = [r[k] for r in done if r.get(k) is not None]
            row[k] = statistics.fmean(vals) if vals else None
            if k.endswith("top1") and len(vals) > 1:
                row[k + "_std"] = statistics.stdev(vals)
        usage = [r["codebook"] for r in done if r.get("codebook")]
        if usage:
            row["codebook"] = {"usage": statistics.fmean(u["usage"] for u in usage),
                               "codes_used": round(statistics.fmean(u["codes_used"] for u in usage)),
                               "perplexity": statistics.fmean(u["perplexity"] for u in usage),
                               "vocab": usage[0]["vocab"]}
        agg["rows"][name] = row
    agg["shared_wall_s"] = {k: statistics.fmean(s["shared_wall_s"][k] for s in states if k in s["shared_wall_s"])
                            for k in {k for s in states for k in s["shared_wall_s"]}}
    tops = [s["teacher_top1"] for s in states if s.get("teacher_top1") is not None]
    agg["teacher_top1"] = statistics.fmean(tops) if tops else None
    return agg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.subset:
        n = args.subset
        budget = replace(budget, train=min(budget.train, n), val=min(budget.val, max(CLASSES, n // 2)),
                         finetune_train=min(budget.finetune_train, max(CLASSES, n // 2)),
                         batch=min(budget.batch, max(2, n // 4)), mim_batch=min(budget.mim_batch, max(2, n // 4)),
                         tok_batch=min(budget.tok_batch, max(2, n // 2)),
                         teacher_batch=min(budget.teacher_batch, max(2, round(n * budget.teacher_fraction) // 4)))
    names = [s for s in args.rows.split(",") if s] or [r.name for r in ROWS]
    unknown = set(names) - {r.name for r in ROWS}
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {sorted(unknown)}")
    command = " ".join(["python", "benchmarks/reproduce_fmnist.py", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                              else argv)])
    root = Path(args.out)
    if args.seeds == 1:
        run_seed(args, budget, names, root, 0, command)
        return 0
    if args.only_seed is not None:
        run_seed(args, budget, names, root / f"seed{args.only_seed}", args.only_seed, command)
        return 0
    states = [run_seed(args, budget, names, root / f"seed{s}", s, command) for s in range(args.seeds)]
    root.mkdir(parents=True, exist_ok=True)
    render(root, aggregate(states, list(range(args.seeds))))
    print(f"[reproduce] mean ± std over {args.seeds} seeds in {root / 'results.md'}", flush=True)
    return 0


def run_seed(args: argparse.Namespace, budget: Budget, names: list[str], out: Path, seed: int, command: str
             ) -> dict:
    """Every asked row with one seed, results in ``out`` (resumable); returns the state (results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    if plan_file.is_file() and read_json(plan_file)["budget"] != asdict(budget):
        raise SystemExit(f"{out} holds results of another budget ({read_json(plan_file)['budget']}); "
                         "use another --out")
    write_json(plan_file, {"budget": asdict(budget)})
    (out / ".gitignore").write_text("# checkpoints and cached features (the table, JSON and chart are kept)\n"
                                    "runs/\nrows/\n")
    plan = Plan(budget, out, args.data_path, args.device, args.workers, seed=seed)
    state_file = out / "results.json"
    state = read_json(state_file) if state_file.is_file() else {
        "rows": {}, "shared_wall_s": {}, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    state.update(budget_name=args.budget + (f" (subset {args.subset})" if args.subset else ""), budget=asdict(budget),
                 command=command, machine=machine_info(args.device), seed=seed)

    def save() -> None:
        # merge what another process (e.g. `--rows teacher` run beside this one) wrote in the meantime
        if state_file.is_file():
            disk = read_json(state_file)
            for key in ("rows", "shared_wall_s"):
                for k, v in disk.get(key, {}).items():
                    state[key].setdefault(k, v)
            for k, v in disk.items():
                if k.startswith("codebook_") or k == "teacher_top1":
                    state.setdefault(k, v)
        state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        render(out, state)

    def shared(name: str, run_fn) -> Path:
        """Run a shared stage once; ``run_fn`` runs it and returns its wall seconds."""
        model = plan.stage_dir(name) / "model.safetensors"
        if not model.is_file():
            state["shared_wall_s"][name] = state["shared_wall_s"].get(name, 0.0) + run_fn()
            save()
        return model

    order = [n for n in RUN_ORDER if n in names]
    needs = {r.name: r for r in ROWS}
    if any(needs[n].tokenizer == "vqkd" or n in ("teacher", "features") for n in order):
        teacher = shared("teacher", plan.teacher)
        if state.get("teacher_top1") is None:
            state["teacher_top1"] = read_json(plan.stage_dir("teacher") / "metrics.json")["acc1"]
    else:
        teacher = None
    def run_row(row: Row) -> dict:
        t_pre, tok = 0.0, None
        if row.tokenizer == "vqkd":
            tok = shared("vqkd", lambda: cli(plan.vqkd(teacher)))
        elif row.tokenizer == "dvae":
            tok = shared("dvae", lambda: cli(plan.dvae()))
        if row.backbone == "pixels":
            res, t_eval = evaluate_pixels(plan, out / "rows" / row.name)
            return res | {"pretrain_s": 0.0, "eval_s": t_eval, "wall_s": t_eval}
        if row.backbone == "random":
            ckpt = str(plan.random_init())
        elif row.backbone == "teacher":
            res, t_eval = evaluate_cnn_teacher(plan, teacher, out / "rows" / row.name)
            return res | {"pretrain_s": 0.0, "eval_s": t_eval, "wall_s": t_eval}
        else:
            t_pre = cli(plan.pretrain(row, tok, teacher if row.name == "features" else None))
            ckpt = str(plan.stage_dir(f"pretrain_{row.name}") / "model.safetensors")
        res, t_eval = evaluate(plan, ckpt, out / "rows" / row.name)
        res.update(pretrain_s=t_pre, eval_s=t_eval, wall_s=t_pre + t_eval)
        if tok is not None:
            key = f"codebook_{row.tokenizer}"
            if key not in state:
                state[key] = codebook_usage(tok, plan)
            res["codebook"] = state[key]
        return res

    for name in order:
        if name in state["rows"]:
            print(f"[reproduce] {name}: done, skipped", flush=True)
            continue
        print(f"[reproduce] {name}: {needs[name].label}", flush=True)
        try:
            res = run_row(needs[name])
        except Exception as e:  # keep going: the other rows still make a table; a rerun retries this one
            state.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
            print(f"[reproduce] {name} FAILED: {e!r}", flush=True)
            save()
            continue
        state.get("failed", {}).pop(name, None)
        state["rows"][name] = res
        save()
        print(f"[reproduce] {name}: {json.dumps(res)}", flush=True)
    save()
    print(f"[reproduce] table in {out / 'results.md'}", flush=True)
    return state


if __name__ == "__main__":
    raise SystemExit(main())
