"""The config of every stage of the quickstart, as the mapping a user would put in that command's ``--config`` YAML
file (the quickstart writes each to ``configs/<stage>.yaml``, so any stage reruns with one command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import CNN_CHANNELS, NORM, Plan


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
                          "use_whole_codebook": plan.tok_whole_codebook}}},
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


def segment_config(checkpoint: Path, root: str, out: Path, seed: int, fast: bool, progress: bool) -> dict:
    """``beitv2 segment --preset seg_fmnist_cpu`` (the recipe named under ``recipe``) at the quickstart's scale: 450
    poly iterations of batch 8 (lr 2e-3, 30 warmup) on 1,200 training compositions, mIoU on 200 test compositions
    (fast: 40 iterations, 160 / 40 compositions)."""
    iters, train, val = (40, 160, 40) if fast else (450, 1200, 200)
    return {"recipe": "seg_fmnist_cpu",
            "model": {"checkpoint": str(checkpoint)},
            "data": {"kind": "fmnist", "path": root, "fmnist_train_size": train, "fmnist_val_size": val,
                     "num_workers": 0},
            "schedule": {"iters": iters, "eval_every_iters": 0},
            "optim": {"lr": 2e-3, "warmup_steps": max(iters // 15, 1)},
            "train": {"output_dir": str(out), "batch_size": 8, "seed": seed, "progress": progress,
                      "tensorboard": False}}
