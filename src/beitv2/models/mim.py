"""BEiT v2 masked image modeling: the model and its loss, in one reading.

    patches --(masked positions := mask_token)--> ViT blocks --> norm --> lm_head (masked positions)   -> loss_1
    [CLS of the last block] + [patch tokens after block l] --> head_layers blocks (shared rel-pos bias)
                                                           --> the same norm and lm_head             -> loss_2
    loss = loss_1 + loss_2

`BEiTv2ForMIM.forward(images, mask)` returns the logits of both heads at the masked patches;
`BEiTv2ForMIM.loss(logits, targets, mask)` picks the targets at the same patches and scores each head. The mask is a
boolean [B, N] (True = masked) or each row's masked positions [B, M], ascending (what `MIMDataset` ships as
``mask_index``); `MaskedPatches` converts it once per call, and its `take` is the one gather of masked patches.
Because the loss reads the last backbone block only at CLS and the masked tokens, and the last aggregation block only
at the masked tokens, those two blocks compute just these rows (`backbone.BEiTBlock` with ``rows``): keys and values
still come from every token, so the outputs there are the whole blocks'.

The model *is* the backbone (a `BEiTViT` subclass) so its state dict has the official top-level keys: `cls_token`,
`mask_token`, `patch_embed.*`, `rel_pos_bias.*`, `blocks.*`, `norm.*`, `lm_head.*`, `cls_pt_layers.*` (and
`cls_pt_norm.*`, `cls_pt_lm_head.*` when the head is not shared).

Targets (``config.target``): discrete tokenizer codes (BEiT v1/v2, cross-entropy, ``mlm_acc``), or, as ablations,
normalised pixels of the masked patches (MSE) and teacher features (``1 - cosine``, ``target_cos``). The head width
follows the target (`MIMConfig.out_dim`); `beitv2.mim_targets` makes the per-patch targets from a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check, opt
from .backbone import BEiTViT, ViTConfig, make_block, rescale_block, select_rows


@dataclass
class MIMConfig:
    backbone: ViTConfig = field(default_factory=ViTConfig, metadata={"help": "pre-training ViT"})
    vocab_size: int = opt(8192, "tokenizer vocabulary (codes to predict)")
    target: str = opt("tokens", "'tokens' (tokenizer codes, CE), 'pixels' (normalised pixels, MSE) or "
                                "'features' (teacher features, cosine)")
    target_dim: int = opt(0, "width of regression targets for target=features (teacher dim)")
    norm_pix_loss: bool = opt(True, "pixel targets normalised per patch (MAE's norm_pix_loss)")
    patch_aggregation: bool = opt(True, "BEiT v2 patch aggregation head (False = BEiT v1-style single loss)")
    early_layers: int = opt(9, "l: the patch tokens after this block (1-based) feed the aggregation head")
    head_layers: int = opt(2, "blocks in the aggregation head")
    shared_lm_head: bool = opt(True, "aggregation head shares the final norm and lm_head")
    cls_pt_init: str = opt("torch_default", "aggregation blocks' init before the sqrt(2l) rescale: torch_default "
                                            "(official: they are built after the model's init, so PyTorch's "
                                            "kaiming-uniform with non-zero biases) or trunc_normal (as the backbone)")

    def validate(self, prefix: str = "") -> None:
        check(self.target in ("tokens", "pixels", "features"), prefix + "target",
              f"must be tokens, pixels or features, got {self.target!r}")
        if self.target == "tokens":
            check(self.vocab_size >= 2, prefix + "vocab_size", "must be >= 2")
        if self.target == "features":
            check(self.target_dim >= 1, prefix + "target_dim", "set it to the teacher feature width")
        if self.patch_aggregation:
            check(1 <= self.early_layers <= self.backbone.depth, prefix + "early_layers",
                  f"must be in [1, depth={self.backbone.depth}], got {self.early_layers}")
            check(self.head_layers >= 1, prefix + "head_layers", "must be >= 1")
        check(self.cls_pt_init in ("torch_default", "trunc_normal"), prefix + "cls_pt_init",
              f"torch_default or trunc_normal, got {self.cls_pt_init!r}")

    @property
    def out_dim(self) -> int:
        """Width of the MIM head: what a file of this config rebuilds without knowing the target object."""
        if self.target == "tokens":
            return self.vocab_size
        if self.target == "pixels":
            return self.backbone.patch_size ** 2 * self.backbone.in_chans
        return self.target_dim


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order (pixel order p, p, C as in MAE)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def pixel_targets(images: torch.Tensor, patch_size: int, normalize: bool) -> torch.Tensor:
    t = patchify(images.float(), patch_size)
    if normalize:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    return t


class MaskedPatches:
    """The masked patches of a batch, from a boolean (or uint8) mask [B, N] or [B, h, w], or an index (int32/int64)
    [B, M]: ``mask`` (bool [B, N]), ``index`` (each row's masked positions, ascending, [B, M]) and ``keep`` (None when
    every row masks M patches; else which of the M entries are real, the shorter rows being padded with unmasked
    positions).

    An index costs no host sync and keeps every shape static (one graph under torch.compile); a boolean mask is read
    once on the host for its counts."""

    def __init__(self, mask: torch.Tensor, num_patches: int):
        B = mask.shape[0]
        self.keep: torch.Tensor | None = None
        if mask.dtype in (torch.bool, torch.uint8):
            self.mask = mask.reshape(B, -1).bool()
            if self.mask.shape[1] != num_patches:
                raise ValueError(f"a mask of {self.mask.shape[1]} patches for a model of {num_patches}")
            counts = self.mask.sum(1)
            lo, hi = counts.aminmax()
            lo, hi = int(lo), int(hi)
            # a stable sort puts each row's masked positions first, in ascending order
            self.index = torch.sort((~self.mask).to(torch.uint8), dim=1, stable=True).indices[:, :hi]
            if lo != hi:
                self.keep = torch.arange(hi, device=mask.device) < counts[:, None]
        else:
            self.index = mask.long()
            self.mask = torch.zeros(B, num_patches, dtype=torch.bool, device=mask.device).scatter_(1, self.index, True)

    def take(self, x: torch.Tensor, at_index: bool = True) -> torch.Tensor:
        """``x`` [B, N, ...] at the masked patches -> [masked patches, ...], row-major (the order of ``x[mask]``).
        ``at_index=False``: ``x`` [B, M, ...] is already at ``index`` (a block computed only those rows)."""
        x = select_rows(x, self.index) if at_index else x
        return x.flatten(0, 1) if self.keep is None else x[self.keep]


class BEiTv2ForMIM(BEiTViT):
    """``config`` is the `MIMConfig`; ``vit_config`` (read by the `BEiTViT` base) is ``config.backbone``."""

    # state-dict prefixes that exist only for pre-training (dropped when the backbone is evaluated or fine-tuned)
    pretrain_only_keys = ("mask_token", "lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")

    def __init__(self, cfg: MIMConfig):
        cfg.validate()
        super().__init__(cfg.backbone)
        self.config = cfg
        d = cfg.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.lm_head = nn.Linear(d, cfg.out_dim)
        self.cls_pt_layers = None
        if cfg.patch_aggregation:
            b = cfg.backbone
            n = max(b.depth, cfg.early_layers + cfg.head_layers)
            dpr = [b.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
            self.cls_pt_layers = nn.ModuleList([make_block(b, dpr[cfg.early_layers + j], None)
                                                for j in range(cfg.head_layers)])
            if not cfg.shared_lm_head:
                self.cls_pt_norm = nn.LayerNorm(d, eps=1e-6)
                self.cls_pt_lm_head = nn.Linear(d, cfg.out_dim)
        self._init_mim()

    def _init_mim(self) -> None:
        self._trunc_normal(self.mask_token)
        extra: list[nn.Module] = [self.lm_head]
        if self.cls_pt_layers is not None and self.config.cls_pt_init == "trunc_normal":
            extra.append(self.cls_pt_layers)
        if hasattr(self, "cls_pt_lm_head"):
            extra += [self.cls_pt_norm, self.cls_pt_lm_head]
        for m in extra:
            m.apply(self._init_module)
        if self.cls_pt_layers is not None:
            for j, blk in enumerate(self.cls_pt_layers):
                rescale_block(blk, self.config.early_layers + j + 1)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Logits at the masked patches, row-major: [head 1] or [head 1, aggregation head], each [masked, out_dim].
        ``mask``: boolean [B, N] or index [B, M] (see `MaskedPatches`)."""
        cfg = self.config
        masked = MaskedPatches(mask, self.num_patches)
        rows = masked.index + 1  # token positions (CLS is 0)
        # the aggregation head reads every patch of block l: when l is the last block, that block stays whole
        trim = not (cfg.patch_aggregation and cfg.early_layers == self.depth)
        last_rows = torch.cat([torch.zeros_like(rows[:, :1]), rows], dim=1) if trim else None  # CLS + masked
        x, saved = self.forward_features(images, masked.mask, self.mask_token,
                                         return_layers=(cfg.early_layers,) if cfg.patch_aggregation else (),
                                         last_block_rows=last_rows)
        patches = masked.take(x[:, 1:], at_index=not trim)
        logits = [self.lm_head(self.norm(patches))]  # norm and head are per token: gather first, less work
        if cfg.patch_aggregation:
            h = torch.cat([x[:, :1], saved[cfg.early_layers][:, 1:]], dim=1)
            bias = self.rel_pos_bias_for_blocks()
            *first, last = self.cls_pt_layers
            for blk in first:
                h = self.run_block(blk, h, bias)
            h = masked.take(self.run_block(last, h, bias, rows), at_index=False)
            norm, head = (self.norm, self.lm_head) if cfg.shared_lm_head else (self.cls_pt_norm, self.cls_pt_lm_head)
            logits.append(head(norm(h)))
        return logits

    def loss(self, logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the heads' losses against ``targets`` of every patch ([B, N] codes or [B, N, D] values,
        row-major; `beitv2.mim_targets`) at the masked patches of ``mask``, and the metrics ``loss_<head>`` (heads
        from 1), ``mlm_acc_<head>`` (tokens), ``target_cos`` (features: the first head's cosine). Scored in float32."""
        target = self.config.target
        labels = MaskedPatches(mask, self.num_patches).take(targets)
        metrics: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, out in enumerate(logits, start=1):
            out = out.float()
            if target == "tokens":
                loss = F.cross_entropy(out, labels)
                metrics[f"mlm_acc_{i}"] = (out.argmax(-1) == labels).float().mean().detach()
            elif target == "pixels":
                loss = F.mse_loss(out, labels.float())
            else:
                loss = (1.0 - F.cosine_similarity(out, labels.float(), dim=-1)).mean()
            metrics[f"loss_{i}"] = loss.detach()
            total = total + loss
        if target == "features":
            with torch.no_grad():
                metrics["target_cos"] = torch.cosine_similarity(logits[0].float(), labels.float(), dim=-1).mean()
        return total, metrics

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights without the pre-training-only parts (mask token, MIM head, aggregation blocks)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.pretrain_only_keys)}
