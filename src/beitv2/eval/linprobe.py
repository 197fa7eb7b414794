"""Linear probing of a frozen backbone: one linear classifier per chosen block, trained by the engine's loop.

Without augmentation (the default) the backbone runs once per image: the features are cached and the heads train for
many cheap epochs on them (`FeatureDataset`). With ``probe.augment`` the backbone runs inside the task on freshly
augmented images every step (BEiT v1's protocol, much slower). Either way the engine provides DDP, mixed precision,
the per-step cosine schedule, checkpoints with resume, the progress bar, ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..config import check, opt
from ..engine import OptimConfig, TrainConfig, Trainer, param_groups
from ..engine import distributed as D
from ..models.registry import ModelKind, register
from ..tasks import TrainTask
from ..utils.distributed import all_reduce_sum
from .features import layer_features
from .metrics import accuracy, confusion_matrix, topk_correct, write_metrics
from .plots import save_confusion_matrix
from .splits import SplitFeatures

log = logging.getLogger("beitv2.eval")


@dataclass
class ProbeConfig:
    """The linear classifier and its training (``--probe.*``)."""

    batchnorm: bool = opt(False, "BatchNorm1d(affine=False) before each linear head (MAE's linear probe)")
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "adamw (BEiT v1 run_linear_eval) or sgd with momentum "
                                                      "(DINO)")
    momentum: float = opt(0.9, "SGD momentum")
    init_std: float = opt(0.01, "std of the normal init of the head weights (bias 0)")
    augment: bool = opt(False, "RandomResizedCrop + flip every step: the backbone runs in the loop (slow); "
                               "default False: features computed once and cached")
    min_crop_scale: float = opt(0.08, "with augment: RandomResizedCrop minimum scale")
    crop_pct: float = opt(0.875, "evaluation/feature transform: resize to size / crop_pct, centre crop")
    normalize: str = opt("auto", "input normalisation: auto (the backbone's own, see docs), imagenet, inception, "
                                 "clip or none")

    def validate(self, prefix: str = "probe.") -> None:
        check(self.optimizer in ("adamw", "sgd"), prefix + "optimizer", f"adamw or sgd, got {self.optimizer!r}")
        check(0 <= self.momentum < 1, prefix + "momentum", "must be in [0, 1)")
        check(self.init_std > 0, prefix + "init_std", "must be > 0")
        check(0 < self.min_crop_scale <= 1, prefix + "min_crop_scale", "must be in (0, 1]")
        check(0 < self.crop_pct <= 1, prefix + "crop_pct", "must be in (0, 1]")
        check(self.normalize in ("auto", "imagenet", "inception", "clip", "none"), prefix + "normalize",
              f"auto, imagenet, inception, clip or none, got {self.normalize!r}")


def probe_optim_defaults() -> OptimConfig:
    """BEiT v1 `run_linear_eval`: AdamW, lr 1e-3 x total_batch / 256, weight decay 1e-4, cosine to 0."""
    return OptimConfig(lr=1e-3, min_lr=0.0, lr_reference_batch=256, weight_decay=1e-4, warmup_epochs=0.0)


def probe_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/linprobe", epochs=100, batch_size=256, log_every_steps=50, keep_last=1)


@dataclass
class ProbeHeadsConfig:
    """Saved with the heads' weights (checkpoint metadata)."""

    layers: tuple[int, ...] = (12,)
    in_dims: tuple[int, ...] = (1536,)
    num_classes: int = 1000
    batchnorm: bool = False


class ProbeHeads(nn.Module):
    """``heads['<layer>']``: [BatchNorm1d(affine=False)] -> Linear, one per probed block."""

    def __init__(self, cfg: ProbeHeadsConfig, init_std: float = 0.01):
        super().__init__()
        self.config = cfg
        self.layers = tuple(int(x) for x in cfg.layers)
        self.heads = nn.ModuleDict()
        for x, dim in zip(self.layers, cfg.in_dims):
            linear = nn.Linear(dim, cfg.num_classes)
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
            bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if cfg.batchnorm else nn.Identity()
            self.heads[str(x)] = nn.Sequential(bn, linear)

    def forward(self, feats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {x: self.heads[str(x)](feats[x].float()) for x in self.layers}


register(ModelKind("linprobe", ProbeHeadsConfig, ProbeHeads))


class FeatureDataset(Dataset):
    """Cached features as samples ``{'feat_<layer>': [F], 'label'}``."""

    def __init__(self, feats: dict[int, torch.Tensor], labels: torch.Tensor):
        self.feats, self.labels = feats, labels.long()
        if any(len(v) != len(labels) for v in feats.values()):
            raise ValueError("every layer needs one feature row per label")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {f"feat_{x}": v[i] for x, v in self.feats.items()}
        out["label"] = self.labels[i]
        return out


class LinearProbeTask(TrainTask):
    """Sum of the heads' cross-entropies; features from the batch (cached) or from the frozen backbone."""

    def __init__(self, heads: ProbeHeads, backbone: nn.Module | None = None, feature: str = "cls+mean",
                 final_norm: bool = True):
        super().__init__(heads)
        self.backbone = backbone
        self.frozen = ("backbone",) if backbone is not None else ()
        self.feature, self.final_norm = feature, final_norm
        self.freeze()

    def features(self, batch: dict[str, Any]) -> dict[int, torch.Tensor]:
        if "image" in batch:
            if self.backbone is None:
                raise ValueError("image batches need the backbone")
            with torch.no_grad():
                return layer_features(self.backbone, batch["image"], self.model.layers, self.feature,
                                      self.final_norm)
        return {x: batch[f"feat_{x}"] for x in self.model.layers}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        labels = batch["label"]
        logits = self.net(self.features(batch))
        loss = sum(F.cross_entropy(v.float(), labels) for v in logits.values())
        metrics = {f"acc1_l{x}": (v.argmax(-1) == labels).float().mean().detach() for x, v in logits.items()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, autocast: Callable) -> dict[str, float]:
        layers = self.model.layers
        counts = torch.zeros(2 * len(layers) + 2, dtype=torch.float64, device=device)
        for batch in loader:
            batch.pop("num_skipped", None)
            if "label" not in batch:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                feats = self.features(batch)
            # the heads in fp32, as `predict` scores them for metrics.json: a bf16 argmax flips near-ties
            with torch.autocast(device.type, enabled=False):
                logits = self.net({x: v.float() for x, v in feats.items()})
            labels = batch["label"]
            for i, x in enumerate(layers):
                c = topk_correct(logits[x].float(), labels)
                counts[2 * i] += c[1]
                counts[2 * i + 1] += c[5]
            counts[-2] += sum(float(F.cross_entropy(v.float(), labels, reduction="sum")) for v in logits.values())
            counts[-1] += labels.numel()
        counts = all_reduce_sum(counts).tolist()
        n = max(counts[-1], 1)
        out = {"loss": counts[-2] / n}
        for i, x in enumerate(layers):
            out[f"acc1_l{x}"] = 100.0 * counts[2 * i] / n
            out[f"acc5_l{x}"] = 100.0 * counts[2 * i + 1] / n
        out["acc1_best"] = max(out[f"acc1_l{x}"] for x in layers)
        return out


def sgd_optimizer(model: nn.Module, cfg: OptimConfig, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with momentum (DINO's linear probe) over the engine's decay / no-decay groups (the Trainer's optimizer
    hook); fused where every parameter is a float tensor on CPU or CUDA, so a non-finite step is skipped on the
    device without a host sync."""
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, fused=fused)


@torch.no_grad()
def predict(heads: ProbeHeads, feats: dict[int, torch.Tensor], batch_size: int = 4096) -> dict[int, torch.Tensor]:
    """Logits of every head over a whole cached split (CPU)."""
    heads = heads.cpu().eval()
    n = len(next(iter(feats.values())))
    out: dict[int, list[torch.Tensor]] = {x: [] for x in heads.layers}
    for s in range(0, n, batch_size):
        logits = heads({x: v[s:s + batch_size] for x, v in feats.items()})
        for x in heads.layers:
            out[x].append(logits[x])
    return {x: torch.cat(v) if v else torch.zeros(0, heads.config.num_classes) for x, v in out.items()}


@dataclass
class InLoopFeatures:
    """Augmented probing (``probe.augment``): the training images, and the frozen backbone that computes their
    features inside the loop every step, as `layer_features` reads them."""

    images: Dataset
    backbone: nn.Module
    feature: str = "cls+mean"
    final_norm: bool = True
    collate_fn: Callable | None = None
    num_workers: int = 0


@dataclass
class ProbeSettings:
    """How one linear probe trains and what it records: the ``linprobe`` command's ``probe`` / ``optim`` / ``train``
    sections and what the caller adds (the run's config for ``config.yaml``, metrics merged into ``metrics.json``,
    in-loop features for augmented probing)."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=probe_optim_defaults)
    train: TrainConfig = field(default_factory=probe_train_defaults)
    run_config: Any = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    in_loop: InLoopFeatures | None = None


def fit_probe(feats: SplitFeatures, settings: ProbeSettings, dist: D.DistInfo) -> dict:
    """Train one linear head per layer of ``feats.val`` and report top-1/top-5 of each on the validation features.

    Writes ``metrics.json`` and ``confusion_matrix.png`` (best layer) to ``train.output_dir``; returns the metrics.
    With ``settings.in_loop`` (augmented probing) the training features are computed in the loop and ``feats.train``
    is not read.
    """
    probe, optim, train, in_loop = settings.probe, settings.optim, settings.train, settings.in_loop
    val_feats, val_labels, num_classes = feats.val, feats.val_labels, feats.num_classes
    layers = tuple(sorted(val_feats))
    in_dims = tuple(int(val_feats[x].shape[1]) for x in layers)
    heads = ProbeHeads(ProbeHeadsConfig(layers, in_dims, num_classes, probe.batchnorm), probe.init_std)
    if in_loop is not None:
        train_set, n_train = in_loop.images, len(in_loop.images)
        collate_fn, num_workers = in_loop.collate_fn, in_loop.num_workers
    else:
        train_set, n_train = FeatureDataset(feats.train, feats.train_labels), len(feats.train_labels)
        collate_fn, num_workers = None, 0
    per_rank = n_train // dist.world_size
    if train.batch_size > per_rank:
        log.warning("train.batch_size %d > %d training samples per process: using %d", train.batch_size, per_rank,
                    max(per_rank, 1))
        train.batch_size = max(per_rank, 1)
    task = (LinearProbeTask(heads, in_loop.backbone, in_loop.feature, in_loop.final_norm) if in_loop is not None
            else LinearProbeTask(heads))
    val_set = FeatureDataset(val_feats, val_labels)
    factory = partial(sgd_optimizer, momentum=probe.momentum) if probe.optimizer == "sgd" else None
    trainer = Trainer(task, train_set, train, optim, dist=dist, run_config=settings.run_config, val_set=val_set,
                      collate_fn=collate_fn, num_workers=num_workers, optimizer=factory)
    result = trainer.fit()
    metrics: dict[str, Any] = {"status": result.status, "global_step": result.global_step,
                               "num_train": n_train, "num_val": int(len(val_labels)), "num_classes": num_classes}
    if result.status != "finished":
        return metrics
    logits = predict(heads, val_feats)
    per_layer = {x: accuracy(logits[x], val_labels) for x in layers}
    best = max(layers, key=lambda x: (per_layer[x]["acc1"], x))
    metrics.update({"layers": {str(x): per_layer[x] for x in layers}, "best_layer": best,
                    "acc1": per_layer[best]["acc1"], "acc5": per_layer[best]["acc5"]})
    metrics.update(settings.extra_metrics)
    if dist.is_main:
        out = Path(train.output_dir)
        cm = confusion_matrix(logits[best].argmax(-1), val_labels, num_classes)
        metrics["confusion_matrix"] = cm.tolist()
        save_confusion_matrix(cm.numpy(), feats.class_names, out / "confusion_matrix.png",
                              f"linear probe, block {best}")
        write_metrics(out / "metrics.json", metrics)
        log.info("linear probe: " + ", ".join(f"block {x} top-1 {per_layer[x]['acc1']:.2f}%" for x in layers)
                 + f"; best block {best}")
    D.barrier()
    return metrics
