"""Segmentation fine-tuning: the segmenter built from any backbone source, and the training / evaluation task.

A backbone checkpoint (a pre-trained ``mim`` model, a fine-tuned ``vit``, a ``vqkd`` encoder, an official
microsoft/unilm ``.pth``) is remapped as the official segmentation loader does: pre-training-only parts dropped, the
shared relative position table copied into every block's own table, tables resized to the segmentation grid with
the official geometric remap and absolute position embeddings bicubically, the final norm discarded. A ``segmenter``
model file or a transformers `BeitForSemanticSegmentation` folder gives the whole model (to evaluate or continue).
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

from ..checkpoint import load_model, read_model_file, resolve_weights
from ..config import ConfigError, check, opt, reading
from ..interop.hf_segmentation import import_hf_segmentation
from ..models.backbone import ViTConfig
from ..models.segmenter import Segmenter, SegmenterConfig
from ..tasks import TrainTask
from .backbones import Backbone, ModelSource
from .finetune import FinetuneModelConfig, read_finetune_source, remap_state_dict
from .segmentation import (
    all_reduce_confusion,
    confusion_matrix,
    metrics_from_confusion,
    slide_inference,
    whole_inference,
)

log = logging.getLogger("beitv2.segment")


@dataclass
class SegmentationModelConfig(ModelSource):
    """Backbone source and segmenter architecture (``--model.*``); defaults: official BEiT v2 base on ADE20K."""

    img_size: tuple[int, ...] = opt((512,), "training crop = model input size (official 512); position tables "
                                            "and embeddings are resized to its grid")
    out_indices: tuple[int, ...] = opt((), "blocks feeding the pyramid: k = output of the k-th block (1-based, "
                                           "official), 0 = patch embedding (empty = official: 4 6 8 12 for depth "
                                           "12, 8 12 16 24 for depth 24; transformers export needs the last tap "
                                           "before the last block, see docs/segmentation.md)")
    channels: int = opt(0, "UperNet width (0 = embed_dim, official)")
    pool_scales: tuple[int, ...] = opt((1, 2, 3, 6), "UperNet pyramid pooling scales")
    dropout: float = opt(0.1, "Dropout2d before the classifiers")
    auxiliary_head: bool = opt(True, "FCN auxiliary head on the third level")
    auxiliary_channels: int = opt(256, "auxiliary head width")
    auxiliary_loss_weight: float = opt(0.4, "auxiliary loss weight")
    avg_non_ignore: bool = opt(False, "average the loss over labelled pixels only (False = mmseg 0.x)")
    drop_path: float = opt(0.15, "stochastic depth (official: 0.15 base, 0.2 large)")
    grad_checkpointing: bool = opt(False, "recompute blocks in backward (official use_checkpoint)")

    def validate(self, prefix: str = "model.") -> None:
        super().validate(prefix)
        check(len(self.img_size) in (1, 2) and all(int(s) > 0 for s in self.img_size), prefix + "img_size",
              f"one or two positive values, got {self.img_size}")
        check(0 <= self.drop_path < 1, prefix + "drop_path", "must be in [0, 1)")
        check(0 <= self.dropout < 1, prefix + "dropout", "must be in [0, 1)")


def _read_backbone(mcfg: SegmentationModelConfig) -> Backbone:
    src = FinetuneModelConfig(checkpoint=mcfg.checkpoint, filter=mcfg.filter, preset=mcfg.preset,
                              random_init=mcfg.random_init)
    return read_finetune_source(src)


def segmenter_config(src: ViTConfig, mcfg: SegmentationModelConfig, num_classes: int) -> SegmenterConfig:
    """Per-block relative position tables (when the source has any) at the crop's grid, no final norm."""
    rel = src.use_rel_pos_bias or src.use_shared_rel_pos_bias
    bb = replace(src, img_size=tuple(int(s) for s in mcfg.img_size), num_classes=0, use_mean_pooling=True,
                 use_rel_pos_bias=rel, use_shared_rel_pos_bias=False, drop_path_rate=mcfg.drop_path,
                 grad_checkpointing=mcfg.grad_checkpointing)
    return SegmenterConfig(backbone=bb, num_classes=num_classes, out_indices=tuple(mcfg.out_indices),
                           channels=mcfg.channels, pool_scales=tuple(mcfg.pool_scales), dropout=mcfg.dropout,
                           use_auxiliary_head=mcfg.auxiliary_head, auxiliary_channels=mcfg.auxiliary_channels,
                           auxiliary_loss_weight=mcfg.auxiliary_loss_weight, avg_non_ignore=mcfg.avg_non_ignore)


def build_segmenter(mcfg: SegmentationModelConfig, num_classes: int) -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter and a report (source, freshly initialised parts, resolution change)."""
    if not mcfg.random_init:
        whole = _load_whole(mcfg.checkpoint)
        if whole is not None:
            model, desc = whole
            if model.config.num_classes != num_classes:
                raise ConfigError(f"model.checkpoint: {desc} predicts {model.config.num_classes} classes, the data has "
                                  f"{num_classes}")
            return model.train(), {"source": desc, "whole_model": True}
    src, state, desc, _ = _read_backbone(mcfg)
    cfg = segmenter_config(src, mcfg, num_classes)
    cfg.validate("model.")
    model = Segmenter(cfg)
    report: dict[str, Any] = {"source": desc, "src_img_size": list(src.img_hw), "img_size": list(cfg.backbone.img_hw)}
    if state is None:
        return model, report
    remapped = remap_state_dict(state, src, replace(cfg.backbone, use_mean_pooling=True))
    remapped = {f"backbone.{k}": v for k, v in remapped.items() if not k.startswith(("norm.", "fc_norm.", "head."))}
    missing, unexpected = model.load_state_dict(remapped, strict=False)
    bad = [k for k in missing if k.startswith("backbone.") and not k.endswith("relative_position_index")]
    if bad or unexpected:
        raise ValueError(f"{desc}: weights do not fit the segmentation backbone: missing {bad[:8]}, unexpected "
                         f"{unexpected[:8]}")
    log.info("segmenter from %s (grid %s -> %s); pyramid and heads freshly initialised", desc, src.grid_size,
             cfg.backbone.grid_size)
    return model, report


def _load_whole(path: str) -> tuple[Segmenter, str] | None:
    """A whole segmenter from a ``segmenter`` model file or a transformers folder, else None."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and "BeitForSemanticSegmentation" in \
            json.loads((p / "config.json").read_text()).get("architectures", []):
        model, _ = import_hf_segmentation(p)
        return model, f"transformers BeitForSemanticSegmentation {p}"
    try:
        w = resolve_weights(p)
    except FileNotFoundError:
        return None
    if w.suffix != ".safetensors":
        return None
    with reading("model.checkpoint"):
        if read_model_file(w, weights=False).kind != "segmenter":
            return None
    model, _, _ = load_model(w)
    return model, f"segmenter {w}"


# ----------------------------------------------------------------------------------------------------- task

@dataclass
class SegmentationInference:
    mode: str  # "slide" or "whole"
    window: tuple[int, int]
    stride: tuple[int, int]


class SegmentationTask(TrainTask):
    """Pixel cross-entropy (+ auxiliary) in training; the confusion matrix over the validation set (all ranks)."""

    def __init__(self, model: Segmenter, inference: SegmentationInference, figure_samples: int = 0):
        super().__init__(model)
        self.inference = inference
        self.figure_samples = figure_samples
        self.last_eval: dict[str, Any] | None = None

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        logits, aux = self.net(batch["image"], return_aux=True)
        return self.model.loss(logits, aux, batch["mask"])

    def predict(self, x: torch.Tensor, out_size: tuple[int, int], autocast: Callable) -> torch.Tensor:
        """Logits [B, K, *out_size] of normalised images x [B, C, h, w]."""
        model = self.model

        def fwd(t: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(t)

        k = model.config.num_classes
        if self.inference.mode == "slide":
            logits = slide_inference(fwd, x, k, self.inference.window, self.inference.stride)
        else:
            logits = whole_inference(fwd, x, model.config.backbone.img_hw)
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, autocast: Callable) -> dict[str, float]:
        self.model.eval()
        k = self.model.config.num_classes
        ignore = self.model.config.ignore_index
        cm = torch.zeros(k, k, dtype=torch.long, device=device)
        mine = _own_samples(loader)
        seen, samples = 0, []
        for batch in loader:
            batch.pop("num_skipped", None)
            if "image" not in batch:
                continue
            images, masks = batch["image"], batch["mask"]
            if torch.is_tensor(images):
                groups = [(images, masks)]
            else:
                groups = [(i[None], m[None]) for i, m in zip(images, masks)]
            for x, y in groups:
                take = min(x.shape[0], mine - seen)
                if take <= 0:
                    break
                x, y = x[:take].to(device, non_blocking=True), y[:take].to(device, non_blocking=True)
                pred = self.predict(x, tuple(y.shape[-2:]), autocast).argmax(1)
                cm += confusion_matrix(pred, y, k, ignore)
                seen += take
                for j in range(take):
                    if len(samples) < self.figure_samples:
                        samples.append((x[j].cpu(), y[j].cpu(), pred[j].cpu()))
        cm = all_reduce_confusion(cm)
        m = metrics_from_confusion(cm.cpu())
        self.last_eval = {"metrics": m, "confusion_matrix": cm.cpu(), "samples": samples, "step": self.step}
        self.model.train()
        return {"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]}


def _own_samples(loader) -> int:
    """How many of the loader's samples to count: a `DistributedSampler` pads the last round with repeated images
    (rank r holds positions r, r + world, ... of the padded list), which must be counted once."""
    from torch.utils.data import DistributedSampler

    s = getattr(loader, "sampler", None)
    if isinstance(s, DistributedSampler) and not s.drop_last:
        return len(range(s.rank, len(s.dataset), s.num_replicas))
    return 1 << 62
