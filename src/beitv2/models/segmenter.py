"""Semantic segmentation: a BEiT ViT backbone, the "simple feature pyramid" and a UperNet head (BEiT's ADE20K setup).

The model follows the official BEiT / BEiT v2 segmentation backbone and mmseg heads, laid out as transformers'
`BeitForSemanticSegmentation` so that export to transformers is a renaming (`beitv2.interop.hf_segmentation`):

* ``backbone``: a `BEiTViT` (official names: ``backbone.blocks.i.*``) with a relative position table per block at the
  segmentation grid and no final norm. ``out_indices`` names the four tapped token sequences by **block number**:
  k >= 1 is the output of the k-th block (1-based), 0 the patch embedding that enters block 1. Official: 4, 6, 8, 12
  for base, 8, 12, 16, 24 for large (the official code writes them 0-based, 3, 5, 7, 11 / 7, 11, 15, 23).
  transformers' `BeitForSemanticSegmentation` reads ``hidden_states[i - 1]`` for its out_index i, so its i is our
  block number + 1 (`beitv2.interop.hf_segmentation`). The taps lose the CLS token and become [B, D, H/p, W/p]
  maps; blocks after the deepest tap are kept (their weights travel with the model) but not run.
* ``fpn1`` .. ``fpn4``, the simple feature pyramid (strides p/4, p/2, p, 2p: 4, 8, 16, 32 for patch 16):
  ``fpn1`` = ConvT(2, 2) -> BatchNorm -> GELU -> ConvT(2, 2), ``fpn2`` = ConvT(2, 2), ``fpn3`` = identity,
  ``fpn4`` = MaxPool(2). The official code keeps them inside the backbone module; here they sit beside it (the
  layout of transformers' legacy `BeitForSemanticSegmentation` checkpoints: ``fpn1.0``, ``fpn1.1``, ``fpn1.3``,
  ``fpn2.0``).
* ``decode_head``: transformers' `UperNetHead` (PPM with pool scales 1, 2, 3, 6 on the last level, FPN fusion,
  ``channels`` wide, 768 = D officially), with mmseg's Dropout2d(0.1) before the classifier.
* ``auxiliary_head``: transformers' `UperNetFCNHead` on the third level (256 channels, one 3x3 conv, dropout 0.1),
  trained with loss weight 0.4 and unused at inference.

Logits come out at stride p/4 (as transformers' model); the loss upsamples them bilinearly to the label size and
applies cross-entropy with ignore index 255. mmseg 0.x averages the per-pixel loss over *all* pixels, ignored ones
counting as zero (``avg_non_ignore=False``, the default here); ``avg_non_ignore=True`` averages over labelled
pixels only (transformers' loss, later mmseg's option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check, opt
from .backbone import BEiTViT, ViTConfig

ADE20K_OUT_INDICES = {12: (4, 6, 8, 12), 24: (8, 12, 16, 24)}


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Official choice for depth 12 / 24; otherwise four evenly spread blocks ending at the last (1-based)."""
    if depth in ADE20K_OUT_INDICES:
        return ADE20K_OUT_INDICES[depth]
    return tuple(max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3)) + (depth,)


@dataclass
class SegmenterConfig:
    """Architecture of a `Segmenter` (what its model file stores)."""

    backbone: ViTConfig = field(default_factory=lambda: ViTConfig(img_size=(512,), use_rel_pos_bias=True,
                                                                  use_shared_rel_pos_bias=False,
                                                                  use_mean_pooling=True),
                                metadata={"help": "the ViT backbone (per-block relative position tables)"})
    num_classes: int = opt(150, "output classes (ADE20K: 150)")
    out_indices: tuple[int, ...] = opt((), "block numbers feeding the four pyramid levels: k = the k-th block's "
                                           "output (1-based, the official convention), 0 = the patch embedding; "
                                           "transformers' out_indices are these + 1 (empty = official: 4 6 8 12 "
                                           "for depth 12, 8 12 16 24 for depth 24)")
    channels: int = opt(0, "UperNet width (0 = embed_dim, the official choice and the only one transformers' "
                           "BeitForSemanticSegmentation can hold)")
    pool_scales: tuple[int, ...] = opt((1, 2, 3, 6), "pyramid pooling scales of the UperNet head")
    dropout: float = opt(0.1, "Dropout2d before each head's classifier (mmseg dropout_ratio)")
    use_auxiliary_head: bool = opt(True, "FCN auxiliary head on the third level (training only)")
    auxiliary_channels: int = opt(256, "FCN auxiliary head width")
    auxiliary_num_convs: int = opt(1, "3x3 conv layers of the auxiliary head")
    auxiliary_concat_input: bool = opt(False, "concatenate the auxiliary head's input before its classifier")
    auxiliary_loss_weight: float = opt(0.4, "weight of the auxiliary head's loss")
    ignore_index: int = opt(255, "label ignored by the loss and the metrics")
    avg_non_ignore: bool = opt(False, "average the loss over labelled pixels only (False = mmseg 0.x: over all "
                                      "pixels, ignored ones counting 0)")

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.out_indices) or default_out_indices(self.backbone.depth)

    @property
    def width(self) -> int:
        return self.channels or self.backbone.embed_dim

    def validate(self, prefix: str = "") -> None:
        self.backbone.validate(prefix + "backbone.")
        check(self.num_classes >= 2, prefix + "num_classes", f"must be >= 2, got {self.num_classes}")
        idx = self.indices
        check(len(idx) == 4, prefix + "out_indices", f"four block numbers, got {list(idx)}")
        check(all(0 <= i <= self.backbone.depth for i in idx) and list(idx) == sorted(idx), prefix + "out_indices",
              f"non-decreasing block numbers in 0..{self.backbone.depth} (k = output of block k, 0 = patch "
              f"embedding), got {list(idx)}")
        check(self.channels >= 0, prefix + "channels", "must be >= 0 (0 = embed_dim)")
        check(len(self.pool_scales) >= 1 and all(s >= 1 for s in self.pool_scales), prefix + "pool_scales",
              "positive values")
        check(0 <= self.dropout < 1, prefix + "dropout", "must be in [0, 1)")
        check(self.auxiliary_channels >= 1, prefix + "auxiliary_channels", "must be >= 1")
        check(self.auxiliary_num_convs >= 0, prefix + "auxiliary_num_convs", "must be >= 0")
        check(self.auxiliary_loss_weight >= 0, prefix + "auxiliary_loss_weight", "must be >= 0")
        check(self.backbone.patch_size % 4 == 0, prefix + "backbone.patch_size",
              f"the simple feature pyramid needs a patch size divisible by 4, got {self.backbone.patch_size}")


class DropoutConv2d(nn.Conv2d):
    """A 1x1 classifier conv with mmseg's Dropout2d in front, keeping transformers' parameter names
    (``classifier.weight``) so the heads load into `BeitForSemanticSegmentation` unchanged."""

    def __init__(self, in_channels: int, out_channels: int, p: float):
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout2d(x, self.p, self.training) if self.p > 0 else x)


def _head_config(cfg: SegmenterConfig) -> Any:
    from transformers import UperNetConfig

    return UperNetConfig(hidden_size=cfg.width, num_labels=cfg.num_classes, pool_scales=list(cfg.pool_scales),
                         auxiliary_channels=cfg.auxiliary_channels, auxiliary_num_convs=cfg.auxiliary_num_convs,
                         auxiliary_concat_input=cfg.auxiliary_concat_input, auxiliary_in_channels=None,
                         use_auxiliary_head=cfg.use_auxiliary_head)


class Segmenter(nn.Module):
    """BEiT backbone -> simple feature pyramid -> UperNet (+ FCN auxiliary head); see the module docstring."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

        cfg.validate()
        self.config = cfg
        bcfg = cfg.backbone
        self.backbone = BEiTViT(bcfg)
        # no final norm, pooling or classifier: the block outputs are the features (official)
        self.backbone.norm = nn.Identity()
        self.backbone.fc_norm = nn.Identity()
        self.backbone.head = nn.Identity()
        self.out_indices = cfg.indices
        d = bcfg.embed_dim
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                  nn.ConvTranspose2d(d, d, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        hc = _head_config(cfg)
        self.decode_head = UperNetHead(hc, in_channels=[d] * 4)
        self.decode_head.classifier = DropoutConv2d(cfg.width, cfg.num_classes, cfg.dropout)
        self.auxiliary_head = None
        if cfg.use_auxiliary_head:
            self.auxiliary_head = UperNetFCNHead(hc, in_channels=[d] * 4, in_index=2)
            self.auxiliary_head.classifier = DropoutConv2d(cfg.auxiliary_channels, cfg.num_classes, cfg.dropout)
        self._init_heads()

    def _init_heads(self) -> None:
        """mmseg's inits: convs kaiming-normal (fan_out, relu) in ConvModule, classifiers normal(0, 0.01), BN 1/0;
        the transposed convs keep PyTorch's default, as the official code (its init_weights skips them)."""
        heads = [self.decode_head] + ([self.auxiliary_head] if self.auxiliary_head is not None else [])
        for head in heads:
            for m in head.modules():
                if isinstance(m, DropoutConv2d):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return self.config.backbone.depth

    @property
    def last_tap(self) -> int:
        """The deepest tapped block; the blocks after it do not change the logits and are not run."""
        return max(self.out_indices)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four pyramid levels [B, D, H/s, W/s] for s = p/4, p/2, p, 2p."""
        b, _, h, w = x.shape
        gh, gw = h // self.config.backbone.patch_size, w // self.config.backbone.patch_size
        bb = self.backbone
        t = bb.embed(x)
        bias = bb.rel_pos_bias_for_blocks()
        taps = {0: t} if 0 in self.out_indices else {}
        for i, blk in enumerate(bb.blocks[:self.last_tap], start=1):
            t = bb.run_block(blk, t, bias)
            if i in self.out_indices:
                taps[i] = t
        maps = [taps[i][:, 1:].transpose(1, 2).reshape(b, -1, gh, gw) for i in self.out_indices]
        return [self.fpn1(maps[0]), self.fpn2(maps[1]), self.fpn3(maps[2]), self.fpn4(maps[3])]

    def forward(self, x: torch.Tensor, return_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, classes, H', W'] at stride p/4 (as transformers' model); with ``return_aux`` also the
        auxiliary head's (None without one), for the training loss."""
        feats = self.features(x)
        logits = self.decode_head(feats)
        if not return_aux:
            return logits
        return logits, (self.auxiliary_head(feats) if self.auxiliary_head is not None else None)

    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=self.config.ignore_index, reduction="none")
        if self.config.avg_non_ignore:
            return loss.sum() / (labels != self.config.ignore_index).sum().clamp(min=1)
        return loss.mean()

    def loss(self, logits: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        main = self.pixel_loss(logits, labels)
        metrics = {"decode_loss": main.detach()}
        total = main
        if aux is not None:
            a = self.pixel_loss(aux, labels)
            metrics["aux_loss"] = a.detach()
            total = total + self.config.auxiliary_loss_weight * a
        return total, metrics


# ---------------------------------------------------------------------------------------------- layer decay

def layer_id_for_segmenter(name: str, depth: int) -> int:
    """Official `LayerDecayOptimizerConstructor` ids (``num_layers = depth + 2``): ``backbone.cls_token``,
    ``backbone.mask_token``, ``backbone.pos_embed``, ``backbone.patch_embed.*`` -> 0; ``backbone.blocks.i.*`` ->
    i + 1; everything else (the pyramid, both heads) -> depth + 1, whose lr scale is 1."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed") or \
            name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (official: SyncBN in the pyramid and heads), statistics over all ranks."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
