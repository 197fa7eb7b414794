"""Export of a BEiT backbone to timm's `Beit` (`timm.models.beit`).

timm keeps the official key names, so the state dict moves as is, except that pre-training-only parts are dropped
(mask token, MIM head, aggregation blocks) and, because timm's `beitv2_*` models use per-layer tables, a shared table is
cloned into every block (``rel_pos='per_layer'``, the default; the outputs are identical since every block then adds
the same bias). The output folder holds `model.safetensors` and timm's `config.json` (architecture + `model_args`),
so ``timm.create_model('local-dir:FOLDER', pretrained=True)`` rebuilds the model, and its ``pretrained_cfg`` holds the
model's own evaluation preprocessing (`beitv2.interop.preprocessing`), so that
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))`` feeds it what it was trained on. A
1-channel model becomes a 3-channel timm model reading the luma of RGB images. Before anything is written, the timm
model's own forward is compared with ours on a fixed batch; an export that does not reproduce it is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models.backbone import ViTConfig
from ..models.registry import kind_of
from ..utils.sizes import size_field
from .preprocessing import (
    Preprocessing,
    backbone_of,
    check_parity,
    luma_patch_weight,
    parity_input,
    preprocessing_of,
)

REL_POS_CHOICES = ("per_layer", "shared")


def backbone_module(model: nn.Module) -> nn.Module:
    """The ViT inside a model of any kind with a backbone (the model itself for a BEiTViT / BEiTv2ForMIM)."""
    prefix = kind_of(model).backbone_prefix.rstrip(".")
    return model.get_submodule(prefix) if prefix else model


def own_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What an exported model's forward returns, computed by our model: the logits with a head, else the pooled
    feature (CLS after the final norm, or fc_norm of the mean patch token)."""
    net = backbone_module(model)
    tokens, _ = net.forward_features(x)
    return net.forward_head(tokens)


def _img_size(cfg: ViTConfig) -> int | list[int]:
    """timm's form of the input size: an int when square, else [H, W]."""
    s = size_field(cfg.img_hw)
    return s[0] if len(s) == 1 else list(s)


def timm_model_args(cfg: ViTConfig, rel_pos: str = "per_layer", rgb_input: bool = False) -> dict[str, Any]:
    """Keyword arguments of `timm.models.beit.Beit` (or overrides for `timm.create_model('beitv2_*')`);
    ``rgb_input``: a 1-channel model taking RGB (`to_timm_state_dict`)."""
    if rel_pos not in REL_POS_CHOICES:
        raise ValueError(f"rel_pos must be one of {REL_POS_CHOICES}, got {rel_pos!r}")
    per_layer = cfg.use_rel_pos_bias or (cfg.use_shared_rel_pos_bias and rel_pos == "per_layer")
    # No layer scale is init_values=0.0, not None: timm drops nulls from config.json and the beitv2 entry point's
    # default (1e-5) would come back with gammas the weights do not have.
    return dict(
        img_size=_img_size(cfg), patch_size=cfg.patch_size, in_chans=3 if rgb_input else cfg.in_chans,
        num_classes=cfg.num_classes,
        global_pool="avg" if cfg.use_mean_pooling else "token", embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        init_values=cfg.init_values if cfg.init_values > 0 else 0.0, use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias and not per_layer,
    )


def to_timm_state_dict(model: nn.Module, rel_pos: str = "per_layer", rgb_input: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, timm model args) for a strict `load_state_dict` into timm's `Beit`. ``rgb_input`` (1-channel
    models only): the patch embedding reads the luma of a 3-channel input (`preprocessing.luma_patch_weight`)."""
    cfg, state = backbone_of(model)
    if rgb_input:
        if cfg.in_chans != 1:
            raise ValueError(f"rgb_input applies to 1-channel models; this one has {cfg.in_chans} channels")
        state["patch_embed.proj.weight"] = luma_patch_weight(state["patch_embed.proj.weight"])
    args = timm_model_args(cfg, rel_pos, rgb_input)
    shared = "rel_pos_bias.relative_position_bias_table"
    if args["use_rel_pos_bias"] and shared in state:
        table = state.pop(shared)
        for i in range(cfg.depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return state, args


def timm_architecture(cfg: ViTConfig) -> str:
    """The timm entry point whose defaults are closest (the model args override every architectural field)."""
    return "beitv2_large_patch16_224" if (cfg.embed_dim, cfg.depth) == (1024, 24) else "beitv2_base_patch16_224"


def build_timm_model(model: nn.Module, rel_pos: str = "per_layer", rgb_input: bool = False) -> nn.Module:
    """A timm `Beit` holding ``model``'s weights (loaded strictly, so key or shape drift fails here)."""
    import timm

    state, args = to_timm_state_dict(model, rel_pos, rgb_input)
    cfg, _ = backbone_of(model)
    tm = timm.create_model(timm_architecture(cfg), pretrained=False, **args)
    tm.load_state_dict(state, strict=True)
    return tm.eval()


def check_export(model: nn.Module, exported: nn.Module, what: str, rgb_input: bool = False,
                 output: Any = None) -> None:
    """Refuse (ValueError) an ``exported`` model whose own forward differs from ``model``'s on a fixed batch;
    ``output(exported, x)`` picks the compared tensor (default: its forward)."""
    cfg, _ = backbone_of(model)
    x = parity_input(cfg)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = own_output(model, x)
            xin = x.expand(-1, 3, -1, -1) if rgb_input else x
            theirs = output(exported, xin) if output is not None else exported(xin)
    finally:
        model.train(training)
    check_parity(ours, theirs, what)


def move_into(tmp: Path, out: Path) -> Path:
    """Move the files of folder ``tmp`` into ``out`` one by one with `os.replace` (each file appears atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def pretrained_cfg_of(pre: Preprocessing) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the preprocessing ``pre`` (see `Preprocessing.timm_crop_pct`)."""
    chans = 3 if pre.in_chans == 1 else pre.in_chans
    stats = pre.export_mean_std() or ([0.0] * chans, [1.0] * chans)  # 'none': [0, 1] as is
    return {"tag": "beitv2_export", "input_size": [chans, *pre.img_hw], "fixed_input_size": True,
            "interpolation": pre.interpolation, "crop_pct": pre.timm_crop_pct(), "crop_mode": "center",
            "mean": stats[0], "std": stats[1]}


def export_timm(model: nn.Module, out_dir: str | Path, rel_pos: str = "per_layer",
                class_names: list[str] | None = None, preprocessing: Preprocessing | None = None,
                normalize: str | None = None) -> Path:
    """Write a timm model folder (`config.json` + `model.safetensors`) for ``model``'s backbone; ``class_names``
    become timm's ``label_names`` (``pretrained_cfg["label_names"]`` once loaded); the ``pretrained_cfg`` records
    ``preprocessing`` (default: `preprocessing_of(model, normalize)`)."""
    from timm.models import save_for_hf

    pre = preprocessing or preprocessing_of(model, normalize)
    rgb = pre.in_chans == 1
    out = Path(out_dir)
    tm = build_timm_model(model, rel_pos, rgb)
    check_export(model, tm, "the timm export", rgb)
    _, args = to_timm_state_dict(model, rel_pos, rgb)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(tm, str(tmp), model_args=args, safe_serialization=True,
                    model_config={"pretrained_cfg": pretrained_cfg_of(pre),
                                  "beitv2": {"trained_in_chans": pre.in_chans, "normalize": pre.normalize,
                                             "input": "luma of RGB" if rgb else "as is"},
                                  **({"label_names": [str(c) for c in class_names]} if class_names else {})})
        return move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
