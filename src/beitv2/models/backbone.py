"""The BEiT Vision Transformer backbone, built on timm's BEiT blocks.

Parameter names are the official ones (`cls_token`, `patch_embed.proj`, `pos_embed`, `rel_pos_bias.*`,
`blocks.i.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1, gamma_2}`, `norm`,
`fc_norm`, `head`), so a state dict moves between this model, timm's `Beit` and microsoft/unilm without renaming.

Attention is written once, in `BEiTAttention` (a subclass of timm's): the whole sequence, some query rows only (a MIM
model's last blocks), or its softmax weights (figures). It runs `F.scaled_dot_product_attention` with the relative
position bias as the additive mask (``fused_attn``, timm's default). On CPU, training on short sequences picks SDPA's
math kernel (`attention_kernel`), and the Trainer switches such networks to the explicit softmax
(`unfuse_short_cpu_attention`); docs/models.md gives the measurements behind both choices.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Attention, Block, RelativePositionBias
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..config import check, opt
from ..utils.sizes import to_2tuple
from .relpos import rel_pos_bias, resize_pos_embed, resize_rel_pos_table

# Below this many tokens, CPU training uses SDPA's math kernel, whose backward beats the CPU flash kernel's on short
# sequences; forward-only passes keep flash (benchmarks/bench_attention.py measures both).
CPU_MATH_ATTENTION_MAX_TOKENS = 128


def forces_math_attention(x: torch.Tensor) -> bool:
    """Whether a block input ``x`` [B, N, D] gets SDPA's math kernel (CPU training on a short sequence)."""
    return (x.device.type == "cpu" and x.shape[1] < CPU_MATH_ATTENTION_MAX_TOKENS and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def attention_kernel(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for a block input ``x`` [B, N, D]."""
    return _kernel_context(forces_math_attention(x))


def _kernel_context(math: bool) -> contextlib.AbstractContextManager:
    return sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()


def _in_kernel_context(math: bool, fn, *args):
    """``fn(*args)`` under the kernel choice ``math``. Checkpointing recomputes the block in backward outside the
    forward's context managers, so the choice travels as an argument and is entered inside the checkpointed call:
    the recomputation then runs the same kernel, with the same saved-tensor metadata, as the forward."""
    with _kernel_context(math):
        return fn(*args)


def unfuse_short_cpu_attention(net: nn.Module, compiled: bool = False) -> int:
    """For a network trained on a CPU (the Trainer calls it, compiled or not): timm's explicit attention (matmul,
    softmax, matmul) in every block, when all its ViTs see fewer than `CPU_MATH_ATTENTION_MAX_TOKENS` tokens, or at
    any length when the network is ``compiled``. Eager, it beats SDPA's math kernel under bf16 autocast on short
    sequences (long ones keep SDPA, where the two are even). Compiled, Inductor fuses the explicit form, where a graph
    would otherwise get the flash kernel and its slow CPU backward. The same arithmetic as SDPA up to rounding.
    Returns how many modules switched."""
    vits = [m for m in net.modules() if isinstance(m, BEiTViT)]
    if not vits or (not compiled and any(v.num_patches + 1 >= CPU_MATH_ATTENTION_MAX_TOKENS for v in vits)):
        return 0
    attns = [m for m in net.modules() if isinstance(m, Attention) and m.fused_attn]
    for m in attns:
        m.fused_attn = False
    return len(attns)


@dataclass
class ViTConfig:
    """Architecture of a BEiT ViT. Defaults: BEiT v2 base pre-training (official `beit_base_patch16_224_8k_vocab`)."""

    img_size: tuple[int, ...] = opt((224,), "input image size: one value (square) or H W")
    patch_size: int = opt(16, "patch size in pixels")
    in_chans: int = opt(3, "input channels (1 for grayscale)")
    embed_dim: int = opt(768, "token width")
    depth: int = opt(12, "number of transformer blocks")
    num_heads: int = opt(12, "attention heads")
    mlp_ratio: float = opt(4.0, "MLP hidden width / embed_dim")
    qkv_bias: bool = opt(True, "q and v biases (the key has none, as in the official code)")
    drop_rate: float = opt(0.0, "dropout after the position embedding, after the attention projection and after "
                                "the MLP (official --drop)")
    head_drop_rate: float = opt(0.0, "dropout on the pooled feature before the classifier (not in the official code)")
    attn_drop_rate: float = opt(0.0, "attention dropout")
    drop_path_rate: float = opt(0.0, "stochastic depth, linear over blocks")
    init_values: float = opt(0.1, "layer-scale init (gamma_1/gamma_2); 0 disables layer scale")
    use_abs_pos_emb: bool = opt(False, "learned absolute position embedding")
    use_rel_pos_bias: bool = opt(False, "a relative position bias table per block (fine-tuning layout)")
    use_shared_rel_pos_bias: bool = opt(True, "one relative position bias table shared by all blocks (pre-training)")
    use_mean_pooling: bool = opt(False, "pool by mean of patch tokens + fc_norm (else CLS after norm)")
    num_classes: int = opt(0, "classifier outputs; 0 = no head")
    head_init_scale: float = opt(0.001, "classifier weight/bias scale after init (official fine-tuning: 0.001)")
    init_std: float = opt(0.02, "std of the truncated-normal init")
    init_trunc_sigmas: float = opt(1.0, "truncation of the init in stds (official pre-training: 1; timm: 100 = none)")
    patch_embed_init: str = opt("trunc_normal", "patch-embedding conv init: trunc_normal (official pre-training "
                                                "model) or torch_default (kaiming-uniform, non-zero bias: the "
                                                "official fine-tuning ViT, hence VQ-KD's encoder and decoder)")
    grad_checkpointing: bool = opt(False, "recompute blocks in backward to save memory")

    @property
    def img_hw(self) -> tuple[int, int]:
        return to_2tuple(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    def validate(self, prefix: str = "") -> None:
        h, w = self.img_hw
        check(isinstance(self.img_size, int) or len(self.img_size) in (1, 2), prefix + "img_size",
              f"one or two values, got {self.img_size}")
        check(self.patch_size > 0, prefix + "patch_size", "must be > 0")
        check(h % self.patch_size == 0 and w % self.patch_size == 0, prefix + "img_size",
              f"{h}x{w} is not divisible by patch_size {self.patch_size}")
        check(self.in_chans > 0, prefix + "in_chans", "must be > 0")
        check(self.depth > 0, prefix + "depth", "must be > 0")
        check(self.num_heads > 0 and self.embed_dim % self.num_heads == 0, prefix + "num_heads",
              f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        check(0.0 <= self.drop_path_rate < 1.0, prefix + "drop_path_rate", "must be in [0, 1)")
        for name in ("drop_rate", "head_drop_rate", "attn_drop_rate"):
            check(0.0 <= getattr(self, name) < 1.0, prefix + name, "must be in [0, 1)")
        check(self.init_values >= 0, prefix + "init_values", "must be >= 0 (0 disables layer scale)")
        check(not (self.use_rel_pos_bias and self.use_shared_rel_pos_bias), prefix + "use_rel_pos_bias",
              "per-layer and shared relative position bias are exclusive")
        check(self.num_classes >= 0, prefix + "num_classes", "must be >= 0")
        check(self.patch_embed_init in ("trunc_normal", "torch_default"), prefix + "patch_embed_init",
              f"trunc_normal or torch_default, got {self.patch_embed_init!r}")


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` [B, N, ...] at the positions ``rows`` [B, Q] -> [B, Q, ...]: a gather whose output shape does not depend
    on the values of ``rows`` (no host sync, one graph under torch.compile)."""
    index = rows.view(*rows.shape, *(1,) * (x.dim() - 2)).expand(*rows.shape, *x.shape[2:])
    return x.gather(1, index)


class BEiTAttention(Attention):
    """timm's BEiT attention (the same parameters and the same arithmetic) that can also answer for some query rows
    only, and return its softmax weights.

    ``rows`` [B, Q]: keys and values come from every token, the queries and the output from the Q positions alone
    (a MIM model's last blocks feed the loss only at the masked tokens and CLS). The relative position bias (own table
    and/or the shared one) is the additive mask of `F.scaled_dot_product_attention` (``fused_attn``), or is added to
    the explicit ``q k^T`` before the softmax."""

    def _qkv(self, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        w = self.qkv.weight
        if rows is None:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.q_bias is not None else None
            return F.linear(x, w, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        b_q, b_kv = (self.q_bias, torch.cat((self.k_bias, self.v_bias))) if self.q_bias is not None else (None, None)
        q = F.linear(select_rows(x, rows), w[:C], b_q).reshape(B, -1, self.num_heads, C // self.num_heads)
        k, v = F.linear(x, w[C:], b_kv).reshape(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q.transpose(1, 2), k, v  # [B, heads, Q or N, head_dim]

    def _bias(self, shared: torch.Tensor | None, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The additive attention bias, [.., heads, N, N], or at the query ``rows`` [B, heads, Q, N]."""
        bias = shared
        if self.relative_position_bias_table is not None:
            own = self._get_rel_pos_bias()
            bias = own if bias is None else own + bias
        if bias is None or rows is None:
            return bias
        B, N, _ = x.shape
        bias = bias.reshape(-1, self.num_heads, N, N).expand(B, -1, -1, -1)
        return bias.gather(2, rows[:, None, :, None].expand(-1, self.num_heads, -1, N))

    def _scores(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a = (q * self.scale) @ k.transpose(-2, -1)
        return a if bias is None else a + bias

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, C] (after norm1) -> [B, N, C], or [B, Q, C] at ``rows``."""
        q, k, v = self._qkv(x, rows)
        bias = self._bias(shared_rel_pos_bias, x, rows)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            out = self.attn_drop(self._scores(q, k, bias).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[0], q.shape[2], -1)))

    def weights(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention [B, heads, N, N] (what SDPA computes without returning it; for figures)."""
        q, k, _ = self._qkv(x, None)
        return self._scores(q, k, self._bias(shared_rel_pos_bias, x, None)).softmax(dim=-1)


class BEiTBlock(Block):
    """timm's BEiT block with `BEiTAttention`; ``rows`` [B, Q] gives only those token positions' outputs [B, Q, D]
    (attention to every token, the residuals and the MLP for the Q rows; stochastic depth draws the same per-sample
    masks as the whole block)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # timm's Block builds its own `Attention`; the subclass adds no state, so the instance is re-classed rather
        # than rebuilt (a rebuilt one would draw its initial weights again and shift every later random draw)
        self.attn.__class__ = BEiTAttention

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attn(self.norm1(x), shared_rel_pos_bias, rows)
        if rows is not None:
            x = select_rows(x, rows)
        if self.gamma_1 is None:
            x = x + self.drop_path1(out)
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.gamma_1 * out)
        return x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))


def make_block(cfg: ViTConfig, drop_path: float, window_size: tuple[int, int] | None) -> BEiTBlock:
    blk = BEiTBlock(
        dim=cfg.embed_dim, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, mlp_ratio=cfg.mlp_ratio,
        proj_drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=drop_path,
        init_values=cfg.init_values if cfg.init_values > 0 else None,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), window_size=window_size,
    )
    blk.mlp.drop1 = nn.Identity()  # the official MLP drops only after fc2 (its dropout after GELU is commented out)
    return blk


def rescale_block(block: Block, layer_id: int) -> None:
    """Official `fix_init_weight`: divide the residual-branch output projections of layer l (1-based) by sqrt(2l)."""
    with torch.no_grad():
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class BEiTViT(nn.Module):
    """BEiT ViT: patch embedding, CLS token, optional abs/relative (shared or per-layer) positions, layer scale."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.vit_config = cfg  # what this class reads; a subclass's ``config`` may hold it (`BEiTv2ForMIM`)
        self.config = cfg  # the model's config, as every registered model has (`beitv2.models.registry`)
        self.embed_dim = self.num_features = cfg.embed_dim
        self.depth = cfg.depth
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size=cfg.img_hw, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=cfg.embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, cfg.embed_dim)) if cfg.use_abs_pos_emb \
            else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rel_pos_bias = RelativePositionBias(self.grid_size, cfg.num_heads) if cfg.use_shared_rel_pos_bias \
            else None
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        window = self.grid_size if cfg.use_rel_pos_bias else None
        self.blocks = nn.ModuleList([make_block(cfg, dpr[i], window) for i in range(cfg.depth)])
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm = nn.Identity() if cfg.use_mean_pooling else norm(cfg.embed_dim)
        self.fc_norm = norm(cfg.embed_dim) if cfg.use_mean_pooling else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------------------------------------------- init
    def _trunc_normal(self, t: torch.Tensor) -> None:
        std = self.vit_config.init_std
        trunc_normal_(t, std=std, a=-std * self.vit_config.init_trunc_sigmas, b=std * self.vit_config.init_trunc_sigmas)

    def _init_module(self, m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d) and self.vit_config.patch_embed_init == "torch_default":
            return  # the official fine-tuning ViT's `_init_weights` has no Conv2d branch: PyTorch's own init stays
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            self._trunc_normal(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        self.apply(self._init_module)
        self._trunc_normal(self.cls_token)
        if self.pos_embed is not None:
            self._trunc_normal(self.pos_embed)
        for i, blk in enumerate(self.blocks):
            rescale_block(blk, i + 1)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.vit_config.head_init_scale)
                self.head.bias.mul_(self.vit_config.head_init_scale)

    # ---------------------------------------------------------------------------------------------- utilities
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay in fine-tuning (timm's convention)."""
        skip = {"pos_embed", "cls_token"}
        skip |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return skip

    def get_num_layers(self) -> int:
        return self.depth

    def rel_pos_bias_for_blocks(self) -> torch.Tensor | None:
        """The shared bias [heads, 1+N, 1+N] handed to every block (None for per-layer or no tables)."""
        if self.rel_pos_bias is None:
            return None
        rpb = self.rel_pos_bias  # timm's RelativePositionBias (official names); its gather as one op, see rel_pos_bias
        return rel_pos_bias(rpb.relative_position_bias_table, rpb.relative_position_index, rpb.window_area + 1)

    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """Change the input resolution in place: position embedding resized bicubically, relative position tables
        with the official geometric-progression cubic remap (`beitv2.models.relpos`)."""
        img_hw = to_2tuple(img_size)
        old_grid = self.grid_size
        self.patch_embed.set_input_size(img_size=img_hw)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.vit_config.img_size = img_hw
        if self.grid_size == old_grid:
            return
        if self.pos_embed is not None:
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, old_grid, self.grid_size))
        owners = [m for m in self.modules() if getattr(m, "relative_position_bias_table", None) is not None]
        for m in owners:
            table = resize_rel_pos_table(m.relative_position_bias_table.data, old_grid, self.grid_size)
            with warnings.catch_warnings():  # timm rebuilds the index buffer; its own (linear) table resize is replaced
                warnings.simplefilter("ignore")
                m.set_window_size(self.grid_size)
            m.relative_position_bias_table = nn.Parameter(table)

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding; masked positions take ``mask_token`` before CLS and positions are added (official order)."""
        x = self.patch_embed(x)
        if bool_masked_pos is not None:
            if mask_token is None:
                raise ValueError("bool_masked_pos given without a mask_token")
            w = bool_masked_pos.reshape(x.shape[0], -1, 1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def run_block(self, blk: nn.Module, x: torch.Tensor, rel_pos_bias: torch.Tensor | None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """One block under the attention kernel choice (`forces_math_attention`), recomputed in backward when
        ``grad_checkpointing``; with ``rows`` [B, Q] only those token positions' outputs (`BEiTBlock`)."""
        math = forces_math_attention(x)
        if self.vit_config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(_in_kernel_context, math, blk, x, rel_pos_bias, rows, use_reentrant=False)
        return _in_kernel_context(math, blk, x, rel_pos_bias, rows)

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None, return_layers: Sequence[int] = (),
                         last_block_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Tokens after the last block (before the final norm) and the outputs of blocks ``return_layers`` (1-based).

        With ``last_block_rows`` [B, Q] the last block computes only those token positions and the first output is
        [B, Q, D]; ``return_layers`` may then not include the last block."""
        if last_block_rows is not None and self.depth in return_layers:
            raise ValueError("last_block_rows trims the last block, whose full output return_layers asks for")
        x = self.embed(x, bool_masked_pos, mask_token)
        rel_pos_bias = self.rel_pos_bias_for_blocks()
        wanted = set(return_layers)
        saved: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks, start=1):
            x = self.run_block(blk, x, rel_pos_bias, last_block_rows if i == self.depth else None)
            if i in wanted:
                saved[i] = x
        return x, saved

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image feature: fc_norm(mean of patch tokens), or norm(tokens)[:, 0] (CLS)."""
        if self.vit_config.use_mean_pooling:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return self.norm(tokens)[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        feats = self.head_drop(self.pool(tokens))
        return feats if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward_features(x)
        return self.forward_head(tokens)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens [B, N, D] (fc_norm when mean-pooling, else norm): what teachers and VQ-KD use."""
        tokens, _ = self.forward_features(x)
        return self.fc_norm(tokens[:, 1:]) if self.vit_config.use_mean_pooling else self.norm(tokens)[:, 1:]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Softmax attention [B, heads, 1+N, 1+N] of block ``layer`` (`BEiTAttention.weights`)."""
        layer = layer % self.depth
        h = self.embed(x)
        bias = self.rel_pos_bias_for_blocks()
        for blk in self.blocks[:layer]:
            h = blk(h, shared_rel_pos_bias=bias)
        blk = self.blocks[layer]
        return blk.attn.weights(blk.norm1(h), bias)
