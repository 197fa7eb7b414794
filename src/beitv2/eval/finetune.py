"""Fine-tuning: a classifier ViT from a pre-training checkpoint, layer-wise lr decay ids, the training task.

Checkpoint remapping follows the official `run_class_finetuning.py --finetune` branch: the pre-training
parts (``mask_token``, ``lm_head``, ``cls_pt_layers``) are dropped, the shared relative position table is copied
into every block's own table, ``*relative_position_index`` buffers are rebuilt, position tables and embeddings are
resized when the resolution changes (geometric interpolation, `beitv2.models.relpos`), and under mean pooling the
pre-trained final ``norm`` is discarded for a fresh ``fc_norm``. The classifier is initialised at
scale 0.001.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from ..checkpoint import save_model
from ..config import ConfigError, check, opt, reading
from ..engine import distributed as D
from ..models.backbone import BEiTViT, ViTConfig, to_2tuple
from ..models.registry import KINDS, ModelKind, register
from ..models.relpos import resize_state_dict, shared_table_to_per_layer
from ..tasks import TrainTask
from ..utils.distributed import all_reduce_sum
from .backbones import Backbone, ModelSource, read_source
from .metrics import confusion_matrix, topk_correct, write_metrics

log = logging.getLogger("beitv2.eval")


@dataclass
class FinetuneModelConfig(ModelSource):
    """Source checkpoint and classifier architecture (``--model.*``)."""

    img_size: tuple[int, ...] = opt((), "fine-tuning input size, one value or H W (empty = pre-training size); "
                                        "position tables and embeddings are resized")
    use_cls: bool = opt(False, "classify from norm(CLS) instead of fc_norm(mean of patch tokens) (official "
                               "--use_cls)")
    rel_pos_bias: bool = opt(True, "per-block relative position tables, the shared pre-training table copied "
                                   "into each (official default); False keeps the checkpoint's layout")
    drop_path: float = opt(0.1, "stochastic depth rate (official base: 0.1 for 300-epoch, 0.2 for 1600-epoch "
                                "pre-training)")
    drop_rate: float = opt(0.0, "dropout after the position embedding and inside the blocks (official --drop; "
                                "before this option existed the name meant the classifier dropout, now "
                                "head_drop_rate)")
    head_drop_rate: float = opt(0.0, "dropout on the pooled feature before the classifier (not official)")
    attn_drop_rate: float = opt(0.0, "attention dropout")
    head_init_scale: float = opt(0.001, "classifier weight and bias multiplied by this after init (official)")
    grad_checkpointing: bool = opt(False, "recompute blocks in backward to save memory")
    num_classes: int = opt(0, "classifier outputs; 0 = the classes of the data (class sub-folders, Fashion-MNIST); "
                              "required for WebDataset shards (labels 0..n-1 in their .cls entries)")

    def validate(self, prefix: str = "model.") -> None:
        super().validate(prefix)
        check(self.num_classes >= 0, prefix + "num_classes", f"must be >= 0, got {self.num_classes}")
        check(len(self.img_size) in (0, 1, 2) and all(int(s) > 0 for s in self.img_size), prefix + "img_size",
              f"empty, one or two positive values, got {self.img_size}")
        check(0 <= self.drop_path < 1, prefix + "drop_path", "must be in [0, 1)")
        check(0 <= self.drop_rate < 1, prefix + "drop_rate", "must be in [0, 1)")
        check(0 <= self.head_drop_rate < 1, prefix + "head_drop_rate", "must be in [0, 1)")
        check(0 <= self.attn_drop_rate < 1, prefix + "attn_drop_rate", "must be in [0, 1)")
        check(self.head_init_scale > 0, prefix + "head_init_scale", "must be > 0")


# ---------------------------------------------------------------------------------------------- layer decay

def layer_id_for_vit(name: str, depth: int) -> int:
    """Official `get_num_layer_for_vit` with ``num_max_layer = depth + 2``.

    ``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.*`` -> 0; ``blocks.k.*`` -> k + 1; everything else
    (the shared ``rel_pos_bias``, ``norm``, ``fc_norm``, ``head``) -> depth + 1.
    """
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_scale(layer_id: int, depth: int, decay: float) -> float:
    """lr multiplier of a layer id: decay^(depth + 1 - id)."""
    return decay ** (depth + 1 - layer_id)


def layer_id_fn(depth: int, prefix: str = "") -> Callable[[str], int]:
    """`layer_id_for_vit` for parameter names under ``prefix`` (e.g. 'net.' inside the EMA wrapper)."""
    def fn(name: str) -> int:
        return layer_id_for_vit(name[len(prefix):] if prefix and name.startswith(prefix) else name, depth)

    return fn


# ------------------------------------------------------------------------------------------ model preparation

def read_finetune_source(mcfg: FinetuneModelConfig) -> Backbone:
    """The backbone to fine-tune: a beitv2 model file of any kind with a ViT backbone, an official .pth file, or a
    random init of a named architecture."""
    return read_source(mcfg, official=True)


def finetune_config(src: ViTConfig, mcfg: FinetuneModelConfig, num_classes: int) -> ViTConfig:
    """The classifier's ViT config: the source architecture with the fine-tuning head and position layout."""
    per_layer = src.use_rel_pos_bias or (mcfg.rel_pos_bias and src.use_shared_rel_pos_bias)
    shared = src.use_shared_rel_pos_bias and not per_layer
    img = tuple(int(s) for s in mcfg.img_size) or tuple(src.img_hw)
    return replace(src, img_size=img, num_classes=num_classes, use_mean_pooling=not mcfg.use_cls,
                   use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=shared, drop_path_rate=mcfg.drop_path,
                   drop_rate=mcfg.drop_rate, head_drop_rate=mcfg.head_drop_rate, attn_drop_rate=mcfg.attn_drop_rate,
                   head_init_scale=mcfg.head_init_scale, grad_checkpointing=mcfg.grad_checkpointing)


def remap_state_dict(state: dict[str, torch.Tensor], src: ViTConfig, dst: ViTConfig) -> dict[str, torch.Tensor]:
    """Official remapping of a pre-training / other-resolution state dict onto the classifier ``dst``."""
    drop = KINDS["mim"].pretrain_only_keys  # an official pre-training state dict still holds the MIM head
    out = {k: v for k, v in state.items() if not k.startswith(drop) and not k.endswith("relative_position_index")}
    if dst.use_rel_pos_bias:
        out = shared_table_to_per_layer(out, dst.depth)
    src_grid, dst_grid = src.grid_size, dst.grid_size
    if src_grid != dst_grid:
        out = resize_state_dict(out, src_grid, dst_grid)
    w = out.get("head.weight")
    if w is not None and (dst.num_classes == 0 or tuple(w.shape) != (dst.num_classes, dst.embed_dim)):
        log.info("dropping head.weight/head.bias of shape %s (new head: %d classes)", tuple(w.shape), dst.num_classes)
        out.pop("head.weight", None)
        out.pop("head.bias", None)
    if dst.use_mean_pooling:  # norm is Identity: the pre-trained final norm is discarded (official)
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
    else:
        out = {k: v for k, v in out.items() if not k.startswith("fc_norm.")}
    return out


def build_finetune_model(mcfg: FinetuneModelConfig, num_classes: int, source: Backbone | None = None
                         ) -> tuple[BEiTViT, dict[str, Any]]:
    """The classifier and a report (source, missing/unexpected keys, resolution change)."""
    src_cfg, state, desc, _ = source if source is not None else read_finetune_source(mcfg)
    cfg = finetune_config(src_cfg, mcfg, num_classes)
    report: dict[str, Any] = {"source": desc, "src_img_size": list(src_cfg.img_hw), "img_size": list(cfg.img_hw)}
    if state is None:
        report.update(missing=[], unexpected=[])
        return BEiTViT(cfg), report
    with reading("model.checkpoint"):
        remapped = remap_state_dict(state, src_cfg, cfg)
    model = BEiTViT(cfg)
    with reading("model.checkpoint"):
        missing, unexpected = model.load_state_dict(remapped, strict=False)
    fresh = ("head.", "fc_norm.", "norm.")
    bad_missing = [k for k in missing if not k.startswith(fresh)]
    if bad_missing or unexpected:
        raise ConfigError(f"model.checkpoint: {desc}: weights do not fit the classifier: missing "
                          f"{bad_missing[:8]}, unexpected {unexpected[:8]}")
    log.info("fine-tuning from %s; freshly initialised: %s", desc, sorted({k.rsplit('.', 1)[0] for k in missing}))
    if src_cfg.img_hw != cfg.img_hw:
        log.info("resolution %s -> %s: relative position tables / position embeddings resized", src_cfg.img_hw,
                 cfg.img_hw)
    report.update(missing=list(missing), unexpected=list(unexpected))
    return model, report


# ------------------------------------------------------------------------------------------------------ EMA

class WithEMA(nn.Module):
    """The trained classifier ``net`` plus its exponential moving average (timm `ModelEmaV3`) as one module, so
    both land in the engine's checkpoints and a resumed run keeps its EMA. Only ``net`` is trained."""

    def __init__(self, net: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.net = net
        self.config = net.config
        self.ema = ModelEmaV3(net, decay=decay)
        self.ema.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def no_weight_decay(self) -> set[str]:
        return {f"net.{n}" for n in self.net.no_weight_decay()}

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema.update(self.net)


# kind of the engine's checkpoints of a fine-tuning run with EMA (the final files are plain `vit` ones)
register(ModelKind("vit_with_ema", ViTConfig, WithEMA, constructor=lambda c: WithEMA(BEiTViT(c)), backbone="",
                   backbone_prefix="net."))


def classifier_of(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, WithEMA) else model


def ema_of(model: nn.Module) -> nn.Module | None:
    return model.ema.module if isinstance(model, WithEMA) else None


# ----------------------------------------------------------------------------------------------------- task

def even_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix needs an even batch (it mixes sample i with sample B-1-i): a batch made odd by a skipped
    unreadable image loses its last sample (a batch of one is paired with itself), and the log says so."""
    b = x.shape[0]
    if b % 2 == 0:
        return x, y
    if b == 1:
        log.warning("Mixup/CutMix: a batch of 1 image (others unreadable) is mixed with itself")
        return torch.cat([x, x]), torch.cat([y, y])
    log.warning("Mixup/CutMix: odd batch of %d (an unreadable image was skipped): its last image is left out", b)
    return x[:-1], y[:-1]


class ClassificationTask(TrainTask):
    """Mixup/CutMix + the official loss choice in training; top-1/top-5 (and EMA's) on validation, keeping the best
    model in ``<out>/best/``."""

    def __init__(self, model: nn.Module, criterion: nn.Module, mixup: Callable | None = None,
                 out_dir: str | Path | None = None, is_main: bool = True, class_names: list[str] | None = None):
        super().__init__(model)
        self.criterion, self.mixup = criterion, mixup
        self.out = Path(out_dir) if out_dir is not None else None
        self.is_main = is_main
        self.class_names = class_names or []
        self.epoch = 0
        self.last_eval: dict[str, Any] | None = None
        self.best = {"acc1": -1.0}
        if self.out is not None and (self.out / "best" / "metrics.json").is_file():  # a resumed run
            self.best = json.loads((self.out / "best" / "metrics.json").read_text())

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        x, y = batch["image"], batch["label"]
        target = y
        if self.mixup is not None:
            x, y = even_batch(x, y)
            x, target = self.mixup(x, y)
        logits = self.net(x)
        loss = self.criterion(logits.float(), target)
        metrics = {} if self.mixup is not None else {"acc1": (logits.argmax(-1) == y).float().mean().detach()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, autocast: Callable) -> dict[str, float]:
        nets = {"": classifier_of(self.model)}
        ema = ema_of(self.model)
        if ema is not None:
            nets["ema_"] = ema
        for m in nets.values():
            m.eval()
        counts = {p: torch.zeros(3, dtype=torch.float64, device=device) for p in nets}
        preds: dict[str, list[torch.Tensor]] = {p: [] for p in nets}
        labels: list[torch.Tensor] = []
        n = 0
        for batch in loader:
            batch.pop("num_skipped", None)
            if "image" not in batch:
                continue
            x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            for p, m in nets.items():
                with autocast():
                    logits = m(x).float()
                c = topk_correct(logits, y)
                counts[p] += torch.tensor([c[1], c[5], float(F.cross_entropy(logits, y, reduction="sum"))],
                                          dtype=torch.float64, device=device)
                preds[p].append(logits.argmax(-1).cpu())
            labels.append(y.cpu())
            n += y.numel()
        total = float(all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=device)).item())
        out: dict[str, float] = {}
        for p, c in counts.items():
            c = all_reduce_sum(c).tolist()
            out.update({f"{p}acc1": 100.0 * c[0] / max(total, 1), f"{p}acc5": 100.0 * c[1] / max(total, 1),
                        f"{p}loss": c[2] / max(total, 1)})
        gathered = D.all_gather_object(({p: torch.cat(v) if v else torch.zeros(0, dtype=torch.long)
                                         for p, v in preds.items()},
                                        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)))
        all_preds = {p: torch.cat([g[0][p] for g in gathered]) for p in nets}
        all_labels = torch.cat([g[1] for g in gathered])
        self.last_eval = {"metrics": dict(out), "preds": all_preds, "labels": all_labels, "epoch": self.epoch,
                          "step": self.step}
        if out["acc1"] > float(self.best.get("acc1", -1.0)):
            self.best = {"acc1": out["acc1"], "acc5": out["acc5"], "epoch": self.epoch, "step": self.step + 1}
            if self.is_main and self.out is not None:
                self._save_best()
        out["best_acc1"] = float(self.best["acc1"])
        return out

    def _save_best(self) -> None:
        net = classifier_of(self.model)
        save_model(self.out / "best" / "model.safetensors", net)
        write_metrics(self.out / "best" / "metrics.json", self.best)


def final_report(task: ClassificationTask, num_classes: int) -> dict[str, Any]:
    """metrics.json content from the task's last validation pass (confusion matrix of the final model)."""
    ev = task.last_eval
    if ev is None:
        return {}
    cm = confusion_matrix(ev["preds"][""], ev["labels"], num_classes)
    out = {**ev["metrics"], "epoch": ev["epoch"], "best": task.best, "confusion_matrix": cm.tolist()}
    if "ema_" in ev["preds"]:
        out["ema_confusion_matrix"] = confusion_matrix(ev["preds"]["ema_"], ev["labels"], num_classes).tolist()
    return out


def check_img_size(mcfg: FinetuneModelConfig, patch_size: int) -> None:
    if mcfg.img_size:
        h, w = to_2tuple(tuple(int(s) for s in mcfg.img_size))
        check(h % patch_size == 0 and w % patch_size == 0, "model.img_size",
              f"{h}x{w} is not divisible by the checkpoint's patch size {patch_size}")
