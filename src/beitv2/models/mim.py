"""BEiT v2 masked image modeling: the backbone, a learned mask token, and the MIM head with patch aggregation.

    patches --(masked positions := mask_token)--> ViT blocks --> norm --> lm_head (masked positions)   -> loss_1
    [CLS of the last block] + [patch tokens after block l] --> head_layers blocks (shared rel-pos bias)
                                                           --> the same norm and lm_head             -> loss_2
    loss = loss_1 + loss_2

The model *is* the backbone (a `BEiTViT` subclass) so its state dict has the official top-level keys: `cls_token`,
`mask_token`, `patch_embed.*`, `rel_pos_bias.*`, `blocks.*`, `norm.*`, `lm_head.*`, `cls_pt_layers.*` (and
`cls_pt_norm.*`, `cls_pt_lm_head.*` when the head is not shared).

Targets: discrete tokenizer codes (BEiT v1/v2), or, as ablations, normalised pixels of the masked patches and teacher
features. The head width follows ``config.target`` (`MIMConfig.out_dim`); labels and losses are the targets' own
(`beitv2.mim_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import check, opt
from .backbone import BEiTViT, ViTConfig, gather_rows, make_block, rescale_block


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


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Patch tokens [B, N, D] at positions ``index`` [B, M] -> [B*M, D], in the order of ``tokens[mask]`` when
    ``index`` lists each row's masked positions in ascending order. Unlike boolean indexing, the output shape is known
    without reading the mask (no host sync, one graph for torch.compile)."""
    return gather_rows(tokens, index).flatten(0, 1)


class BEiTv2ForMIM(BEiTViT):
    """``config`` is the `MIMConfig`; ``cfg`` (inherited from `BEiTViT`) is its ViT backbone's."""

    # state-dict prefixes that exist only for pre-training (dropped when the backbone is evaluated or fine-tuned)
    pretrain_only_keys = ("mask_token", "lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")
    # With ``masked_index``, the last backbone block and the last aggregation block compute only the rows the loss
    # reads (CLS + masked tokens, masked tokens): the same outputs there; False runs them whole (benchmarks compare).
    trim_unused_rows: bool = True

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
        if self.cls_pt_layers is not None and self.mim_cfg.cls_pt_init == "trunc_normal":
            extra.append(self.cls_pt_layers)
        if hasattr(self, "cls_pt_lm_head"):
            extra += [self.cls_pt_norm, self.cls_pt_lm_head]
        for m in extra:
            m.apply(self._init_module)
        if self.cls_pt_layers is not None:
            for j, blk in enumerate(self.cls_pt_layers):
                rescale_block(blk, self.config.early_layers + j + 1)

    @property
    def mim_cfg(self) -> MIMConfig:
        """Former name of ``config``."""
        return self.config

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Predictions at the masked positions: [head 1] or [head 1, aggregation head], each [B*M, out_dim].

        ``masked_index`` [B, M] (each row's masked positions, ascending; `MIMDataset` ships it as ``mask_index``)
        selects the masked tokens by a gather of static shape, and lets the last backbone block and the last
        aggregation block compute only the tokens the loss reads (`trim_unused_rows`); without it they are picked by
        boolean indexing after full blocks (a host sync and a data-dependent shape; the eager baseline of
        benchmarks/bench_train_step.py)."""
        bool_masked_pos = bool_masked_pos.reshape(images.shape[0], -1).bool()
        if masked_index is None:
            return self._forward_boolean(images, bool_masked_pos)
        cfg = self.config
        layers = (cfg.early_layers,) if cfg.patch_aggregation else ()
        rows = masked_index + 1  # token positions (CLS is 0)
        trim = self.trim_unused_rows and not (cfg.patch_aggregation and cfg.early_layers == self.depth)
        last_rows = torch.cat([torch.zeros_like(rows[:, :1]), rows], dim=1) if trim else None  # CLS + masked
        x, saved = self.forward_features(images, bool_masked_pos, self.mask_token, return_layers=layers,
                                         last_block_rows=last_rows)
        masked = x[:, 1:].flatten(0, 1) if trim else gather_tokens(x[:, 1:], masked_index)
        outs = [self.lm_head(self.norm(masked))]  # norm and head are per token: gather first, less work
        if cfg.patch_aggregation:
            h = torch.cat([x[:, :1], saved[cfg.early_layers][:, 1:]], dim=1)
            bias = self.rel_pos_bias_for_blocks()
            *first, last = self.cls_pt_layers
            for blk in first:
                h = self.run_block(blk, h, bias)
            h = self.run_block(last, h, bias, rows).flatten(0, 1) if self.trim_unused_rows \
                else gather_tokens(self.run_block(last, h, bias)[:, 1:], masked_index)
            norm, head = (self.norm, self.lm_head) if cfg.shared_lm_head else (self.cls_pt_norm, self.cls_pt_lm_head)
            outs.append(head(norm(h)))
        return outs

    def _forward_boolean(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        layers = (cfg.early_layers,) if cfg.patch_aggregation else ()
        x, saved = self.forward_features(images, bool_masked_pos, self.mask_token, return_layers=layers)
        outs = [self.lm_head(self.norm(x)[:, 1:][bool_masked_pos])]
        if cfg.patch_aggregation:
            h = torch.cat([x[:, :1], saved[cfg.early_layers][:, 1:]], dim=1)
            bias = self.rel_pos_bias_for_blocks()
            for blk in self.cls_pt_layers:
                h = self.run_block(blk, h, bias)
            norm, head = (self.norm, self.lm_head) if cfg.shared_lm_head else (self.cls_pt_norm, self.cls_pt_lm_head)
            outs.append(head(norm(h)[:, 1:][bool_masked_pos]))
        return outs

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights without the pre-training-only parts (mask token, MIM head, aggregation blocks)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.pretrain_only_keys)}
