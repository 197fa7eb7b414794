"""Import of the official microsoft/unilm `beit2` checkpoints (`.pth`) into our models.

Three formats: (a) VQ-KD tokenizers, (b) BEiT v2 pre-training checkpoints with patch aggregation,
(c) fine-tuned classifiers. Our key names are the official ones, so the import is: unwrap, drop what our models do not
keep (training-only and dead keys, `relative_position_index` buffers, which are rebuilt), infer the architecture from
tensor shapes, resize position tables if the resolution changes, and load strictly. A file that does not fit fails
with a `CheckpointMismatchError` naming the missing, unexpected and wrongly-shaped keys.

What shapes cannot tell: the number of heads where there is no relative position table (VQ-KD: width / 64, the
official ViT-B value, unless given) and the patch-aggregation layer `early_layers` (default depth - 3: 9 for base,
21 for large, as released).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models.architectures import get_architecture
from ..models.backbone import BEiTViT, ViTConfig
from ..models.mim import BEiTv2ForMIM, MIMConfig
from ..models.quantizer import QuantizerConfig
from ..models.registry import get_kind
from ..models.relpos import SHARED_TABLE, resize_state_dict, shared_table_to_per_layer, square_window_from_rows
from ..models.vqkd import VQKD, VQKDConfig, vqkd_encoder_config
from ..utils.sizes import size_field, to_2tuple

WRAPPER_KEYS = ("model", "module", "state_dict")
VQKD_DROP_PREFIXES = ("teacher_model.", "scaling_layer.", "loss")
VQKD_DEAD_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")


class CheckpointMismatchError(ValueError):
    """The file's keys or shapes do not fit the requested architecture."""


# --------------------------------------------------------------------------------------------------- reading
def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of an official `.pth`: the `model`, `module` or `state_dict` entry (or the dict itself), without
    `module.` prefixes. Loaded with ``weights_only=True``; the pickled `argparse.Namespace` that official training
    checkpoints carry under `args` is the only non-tensor class allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors carry long messages; keep the cause
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path}: a pickle that is not weights-only (it holds objects other than tensors; "
                             "refused, since loading it could run code)") from e
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
    for key in WRAPPER_KEYS:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; no weights found under "
                             f"{'/'.join(WRAPPER_KEYS)}")
        state[k[len("module."):] if k.startswith("module.") else k] = v
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    return state


# ----------------------------------------------------------------------------------------- strict loading
def _few(keys: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                     allow_missing: Iterable[str] = ()) -> list[str]:
    """Raise `CheckpointMismatchError` unless ``state`` fits ``model`` exactly (except missing keys starting with
    ``allow_missing``, which stay freshly initialised). Returns the allowed missing keys."""
    allow = tuple(allow_missing)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    fresh = [k for k in missing if allow and k.startswith(allow)]
    missing = [k for k in missing if k not in fresh]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in state
              if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing: {_few(missing)}" if missing else "",
                 f"unexpected: {_few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {_few(shapes, 4)}" if shapes else ""]
        raise CheckpointMismatchError(f"{what}: the weights do not fit the architecture; "
                                      + "; ".join(p for p in parts if p))
    return fresh


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                allow_missing: Iterable[str] = ()) -> nn.Module:
    check_state_dict(model, state, what, allow_missing)
    model.load_state_dict(state, strict=False)
    return model


# --------------------------------------------------------------------------------------- shape inference
def _require(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"{what}: key {key!r} is missing (the file has e.g. "
                                      f"{_few(sorted(state), 5)}); is it the right kind of checkpoint?")
    return state[key]


def _num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def infer_vit_fields(state: dict[str, torch.Tensor], what: str, prefix: str = "",
                     num_heads: int | None = None) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """ViTConfig fields readable from an official ViT state dict (under ``prefix``), and its patch grid if known."""
    d = int(_require(state, prefix + "cls_token", what).shape[-1])
    pw = _require(state, prefix + "patch_embed.proj.weight", what)
    depth = _num_blocks(state, prefix + "blocks.")
    if depth == 0:
        raise CheckpointMismatchError(f"{what}: no {prefix}blocks.* keys")
    fc1 = _require(state, prefix + "blocks.0.mlp.fc1.weight", what)
    table_key = next((k for k in (prefix + SHARED_TABLE, prefix + "blocks.0.attn.relative_position_bias_table")
                      if k in state), None)
    if table_key is not None:
        heads = int(state[table_key].shape[1])
        if num_heads is not None and num_heads != heads:
            raise CheckpointMismatchError(f"{what}: num_heads={num_heads} given but {table_key} has {heads} heads")
    else:
        heads = num_heads or max(d // 64, 1)
    grid = None
    if prefix + "pos_embed" in state:
        n = int(state[prefix + "pos_embed"].shape[1]) - 1
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointMismatchError(f"{what}: {prefix}pos_embed has {n} patch positions, not a square grid")
        grid = (side, side)
    elif table_key is not None:
        side = square_window_from_rows(int(state[table_key].shape[0]))
        grid = (side, side)
    fields = dict(
        patch_size=int(pw.shape[-1]), in_chans=int(pw.shape[1]), embed_dim=d, depth=depth, num_heads=heads,
        mlp_ratio=fc1.shape[0] / d, qkv_bias=prefix + "blocks.0.attn.q_bias" in state,
        init_values=0.1 if prefix + "blocks.0.gamma_1" in state else 0.0,  # value irrelevant: gammas are loaded
        use_abs_pos_emb=prefix + "pos_embed" in state,
        use_rel_pos_bias=prefix + "blocks.0.attn.relative_position_bias_table" in state,
        use_shared_rel_pos_bias=prefix + SHARED_TABLE in state,
        use_mean_pooling=prefix + "fc_norm.weight" in state,
        num_classes=int(state[prefix + "head.weight"].shape[0]) if prefix + "head.weight" in state else 0,
    )
    if grid is not None:
        fields["img_size"] = size_field((grid[0] * fields["patch_size"], grid[1] * fields["patch_size"]))
    return fields, grid


def _target_grid(img_size: int | Sequence[int] | None, patch: int, src_grid: tuple[int, int] | None,
                 what: str) -> tuple[int, int]:
    if img_size is None:
        if src_grid is None:
            raise CheckpointMismatchError(f"{what}: the file has no position tables to read the resolution from; "
                                          "pass img_size")
        return src_grid
    h, w = to_2tuple(img_size)
    if h % patch or w % patch:
        raise ValueError(f"img_size {h}x{w} is not divisible by the patch size {patch}")
    return h // patch, w // patch


def _drop_index(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("relative_position_index")}


# --------------------------------------------------------------------------------------------------- VQ-KD
def vqkd_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official VQ-KD weights without the teacher, scaling layer, loss modules, dead quantizer buffers and indices."""
    out = {k: v for k, v in _drop_index(state).items()
           if not k.startswith(VQKD_DROP_PREFIXES) and k not in VQKD_DEAD_KEYS}
    return out


def infer_vqkd_config(state: dict[str, torch.Tensor], num_heads: int | None = None,
                      decoder_num_heads: int | None = None) -> VQKDConfig:
    what = "official VQ-KD checkpoint"
    enc, grid = infer_vit_fields(state, what, "encoder.", num_heads)
    if grid is None:
        raise CheckpointMismatchError(f"{what}: no encoder.pos_embed to read the resolution from")
    codebook = _require(state, "quantize.embedding.weight", what)
    dec_width = int(_require(state, "decoder.cls_token", what).shape[-1])
    dec_depth = _num_blocks(state, "decoder.blocks.")
    teacher_dim = int(_require(state, "decode_task_layer.2.weight", what).shape[0])
    keep = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
            "init_values")
    encoder = vqkd_encoder_config(**{k: enc[k] for k in keep})
    return VQKDConfig(
        encoder=encoder, decoder_depth=dec_depth,
        decoder_embed_dim=0 if dec_width == encoder.embed_dim else dec_width,
        decoder_num_heads=decoder_num_heads or (0 if dec_width == encoder.embed_dim else max(dec_width // 64, 1)),
        quantizer=QuantizerConfig(num_codes=int(codebook.shape[0]), code_dim=int(codebook.shape[1])),
        teacher_dim=teacher_dim)


def load_official_vqkd(path: str | Path, architecture: str | VQKDConfig | None = None, num_heads: int | None = None,
                       decoder_num_heads: int | None = None) -> VQKD:
    """An official VQ-KD tokenizer (`vqkd_encoder_base_decoder_*`), ready for `tokenize()` (eval mode).

    ``architecture``: a named architecture (`beitv2.models.architectures`) or `VQKDConfig` to load into (strict);
    otherwise the config is inferred from shapes (heads = width / 64 unless ``num_heads`` / ``decoder_num_heads`` are
    given).
    """
    state = vqkd_state_dict(read_official_state_dict(path))
    if architecture is None:
        cfg = infer_vqkd_config(state, num_heads, decoder_num_heads)
    elif isinstance(architecture, str):
        kind, cfg = get_architecture(architecture)
        if kind != "vqkd":
            raise ValueError(f"architecture {architecture!r} is a {kind} model, not a VQ-KD tokenizer")
    else:
        cfg = architecture
    model = VQKD(cfg)
    load_strict(model, state, f"{path} as VQ-KD")
    model.quantize.mark_initted()  # a loaded codebook must never be re-initialised by k-means
    return model.eval()


# ------------------------------------------------------------------------------------------ pre-training
def load_official_pretrain(path: str | Path, target: str = "mim", img_size: int | Sequence[int] | None = None,
                           num_classes: int = 0, early_layers: int | None = None, num_heads: int | None = None,
                           use_mean_pooling: bool = True, **overrides: Any) -> BEiTViT:
    """An official BEiT v2 pre-training checkpoint (`beit_*_8k_vocab[_cls_pt]`).

    ``target='mim'``: a `BEiTv2ForMIM` for continued pre-training (patch aggregation if the file has
    `cls_pt_layers`; ``early_layers`` defaults to depth - 3). ``target='finetune'``: a fine-tuning `BEiTViT` as the
    official `run_class_finetuning` builds it: the shared table cloned into per-layer tables, MIM-only keys dropped,
    mean pooling with a fresh `fc_norm` (or, ``use_mean_pooling=False``, the pre-trained `norm` on CLS) and a fresh
    `head` of ``num_classes`` outputs. Tables and positions are resized when ``img_size`` differs.
    ``overrides``: further `ViTConfig` fields (e.g. ``drop_path_rate=0.1``).
    """
    if target not in ("mim", "finetune"):
        raise ValueError(f"target must be 'mim' or 'finetune', got {target!r}")
    what = f"{path} as a BEiT v2 pre-training checkpoint"
    state = _drop_index(read_official_state_dict(path))
    fields, src_grid = infer_vit_fields(state, what, "", num_heads)
    lm = _require(state, "lm_head.weight", what)
    dst_grid = _target_grid(img_size, fields["patch_size"], src_grid, what)
    fields["img_size"] = size_field((dst_grid[0] * fields["patch_size"], dst_grid[1] * fields["patch_size"]))
    if target == "mim":
        head_layers = _num_blocks(state, "cls_pt_layers.")
        backbone = ViTConfig(**{**fields, **overrides})
        cfg = MIMConfig(backbone=backbone, vocab_size=int(lm.shape[0]), patch_aggregation=head_layers > 0,
                        early_layers=early_layers or max(backbone.depth - 3, 1), head_layers=max(head_layers, 1),
                        shared_lm_head="cls_pt_lm_head.weight" not in state)
        model: BEiTViT = BEiTv2ForMIM(cfg)
        allow: tuple[str, ...] = ()
    else:
        state = shared_table_to_per_layer(get_kind("mim").backbone_state(state), fields["depth"])
        if use_mean_pooling:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        fields.update(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mean_pooling=use_mean_pooling,
                      num_classes=num_classes)
        model = BEiTViT(ViTConfig(**{**fields, **overrides}))
        allow = ("fc_norm.", "head.")
    if src_grid is not None and src_grid != dst_grid:
        state = resize_state_dict(state, src_grid, dst_grid)
    load_strict(model, state, what, allow_missing=allow)
    return model.eval()


# ------------------------------------------------------------------------------------------- classifier
def load_official_classifier(path: str | Path, img_size: int | Sequence[int] | None = None,
                             num_heads: int | None = None, **overrides: Any) -> BEiTViT:
    """An official fine-tuned classifier (`beit_*_patch16_*`: per-layer tables, `fc_norm` or `norm`, `head`)."""
    what = f"{path} as a BEiT fine-tuned classifier"
    state = _drop_index(read_official_state_dict(path))
    fields, src_grid = infer_vit_fields(state, what, "", num_heads)
    dst_grid = _target_grid(img_size, fields["patch_size"], src_grid, what)
    fields["img_size"] = size_field((dst_grid[0] * fields["patch_size"], dst_grid[1] * fields["patch_size"]))
    model = BEiTViT(ViTConfig(**{**fields, **overrides}))
    if src_grid is not None and src_grid != dst_grid:
        state = resize_state_dict(state, src_grid, dst_grid)
    load_strict(model, state, what)
    return model.eval()


# ------------------------------------------------------------------------------------ our own models
def resize_model(model: BEiTViT, img_size: int | Sequence[int]) -> BEiTViT:
    """A copy of ``model`` (BEiTViT or BEiTv2ForMIM) at another resolution, with the official cubic table remap
    (`BEiTViT.set_input_size` does the same in place)."""
    vit = model.vit_config  # the ViT config of either (a MIM model's backbone)
    new_vit = replace(vit, img_size=size_field(img_size))
    new = BEiTv2ForMIM(replace(model.config, backbone=new_vit)) if isinstance(model, BEiTv2ForMIM) \
        else BEiTViT(new_vit)
    state = resize_state_dict(model.state_dict(), vit.grid_size, new_vit.grid_size)
    load_strict(new, state, f"{type(model).__name__} resized to {new_vit.img_hw}")
    return new.train(model.training)
