"""Export of a BEiT backbone to HF transformers (`BeitModel`, or `BeitForImageClassification` with a head).

Key map (checked against the installed transformers by a strict `load_state_dict` before saving, so a renaming in a
new transformers release fails loudly instead of writing a half-loaded model):

    cls_token / pos_embed            -> embeddings.cls_token / embeddings.position_embeddings
    patch_embed.proj.*               -> embeddings.patch_embeddings.projection.*
    rel_pos_bias.*_table             -> shared_position_bias.relative_position_bias_table
    blocks.i.norm1 / norm2           -> layers.i.layernorm_before / layernorm_after
    blocks.i.attn.qkv.weight         -> layers.i.attention.{q,k,v}_proj.weight (rows split in thirds)
    blocks.i.attn.q_bias / v_bias    -> layers.i.attention.q_proj.bias / v_proj.bias (the key has no bias)
    blocks.i.attn.proj.*             -> layers.i.attention.o_proj.*
    blocks.i.attn.*_table            -> layers.i.relative_position_bias.relative_position_bias_table
    blocks.i.mlp.fc1 / fc2           -> layers.i.mlp.fc1 / fc2
    blocks.i.gamma_1 / gamma_2       -> layers.i.lambda_1 / lambda_2
    norm (CLS pooling)               -> layernorm
    fc_norm (mean pooling)           -> pooler.layernorm
    head                             -> classifier (top level; the rest gains the `beit.` prefix)

transformers' relative position bias reshapes the table as (2Ww-1, 2Wh-1), which is only right for square windows, so
non-square models with relative positions are refused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models.backbone import ViTConfig
from .timm_export import backbone_of, move_into

REL_POS_CHOICES = ("keep", "per_layer")


def hf_config(cfg: ViTConfig, rel_pos: str = "keep", **extra: Any) -> Any:
    """A `transformers.BeitConfig` describing ``cfg`` exactly (LayerNorm eps 1e-6, GELU, no dropout); ``extra``
    adds fields (the segmentation heads')."""
    from transformers import BeitConfig

    if rel_pos not in REL_POS_CHOICES:
        raise ValueError(f"rel_pos must be one of {REL_POS_CHOICES}, got {rel_pos!r}")
    h, w = cfg.img_hw
    if h != w and (cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias):
        raise ValueError(f"transformers' BEiT handles relative position tables of square windows only; this model "
                         f"is {h}x{w}")
    per_layer = cfg.use_rel_pos_bias or (cfg.use_shared_rel_pos_bias and rel_pos == "per_layer")
    kw: dict[str, Any] = dict(
        image_size=h, patch_size=cfg.patch_size, num_channels=cfg.in_chans, hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=cfg.drop_path_rate, layer_norm_eps=1e-6,
        use_mask_token=False, use_absolute_position_embeddings=cfg.use_abs_pos_emb,
        use_relative_position_bias=per_layer, use_shared_relative_position_bias=cfg.use_shared_rel_pos_bias
        and not per_layer, layer_scale_init_value=cfg.init_values, use_mean_pooling=cfg.use_mean_pooling,
    )
    if cfg.num_classes > 0:
        kw["num_labels"] = cfg.num_classes
    return BeitConfig(**kw, **extra)


def to_hf_state_dict(model: nn.Module, rel_pos: str = "keep") -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict with transformers' names, BeitConfig). With a head the names are those of
    `BeitForImageClassification`, otherwise of `BeitModel`."""
    cfg, state = backbone_of(model)
    config = hf_config(cfg, rel_pos)
    d = cfg.embed_dim
    p = "beit." if cfg.num_classes > 0 else ""
    out: dict[str, torch.Tensor] = {}
    shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None and config.use_relative_position_bias:
        for i in range(cfg.depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    elif shared is not None:
        out[p + "shared_position_bias.relative_position_bias_table"] = shared
    simple = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
              "fc_norm.weight": "pooler.layernorm.weight", "fc_norm.bias": "pooler.layernorm.bias"}
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "gamma_1": "lambda_1", "gamma_2": "lambda_2",
             "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
             "attn.q_bias": "attention.q_proj.bias", "attn.v_bias": "attention.v_proj.bias"}
    for k, v in state.items():
        if k in simple:
            out[p + simple[k]] = v
        elif k.startswith("head."):
            out["classifier." + k[len("head."):]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"{p}layers.{i}."
            if rest == "attn.qkv.weight":
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[pre + f"attention.{name}.weight"] = v[j * d:(j + 1) * d].clone()
                continue
            mod, _, leaf = rest.rpartition(".")
            if rest in block:  # parameters named without a module (gammas, biases, tables)
                out[pre + block[rest]] = v
            elif mod in block:
                out[pre + block[mod] + "." + leaf] = v
            else:
                raise KeyError(f"no transformers name for {k}")
        else:
            raise KeyError(f"no transformers name for {k}")
    if not cfg.qkv_bias:  # transformers' q/v projections always carry a bias: zero reproduces "no bias"
        for i in range(cfg.depth):
            out[f"{p}layers.{i}.attention.q_proj.bias"] = torch.zeros(d)
            out[f"{p}layers.{i}.attention.v_proj.bias"] = torch.zeros(d)
    return out, config


def build_hf_model(model: nn.Module, rel_pos: str = "keep") -> nn.Module:
    """The transformers model holding ``model``'s weights, loaded strictly (any key drift raises here)."""
    from transformers import BeitForImageClassification, BeitModel

    state, config = to_hf_state_dict(model, rel_pos)
    hf_cls = BeitForImageClassification if "classifier.weight" in state else BeitModel
    hf = hf_cls(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the key map does not fit the installed transformers {hf_cls.__name__}: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return hf.eval()


def image_processor(model: nn.Module, normalize: str = "imagenet") -> Any:
    """A `BeitImageProcessor` giving the model's input: bicubic resize to its size, [0, 1], then ``normalize``
    (a VQ-KD encoder always sees 2x - 1)."""
    from transformers import BeitImageProcessor

    from ..data.transforms import resolve_norm
    from ..models.vqkd import VQKD

    cfg, _ = backbone_of(model)
    h, w = cfg.img_hw
    if isinstance(model, VQKD) and model.cfg.input_norm == "default":
        norm: Any = ((0.5,) * cfg.in_chans, (0.5,) * cfg.in_chans)
    else:
        norm = resolve_norm(normalize, cfg.in_chans)
    return BeitImageProcessor(do_resize=True, size={"height": h, "width": w}, resample=3, do_center_crop=False,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=norm is not None,
                              image_mean=list(norm[0]) if norm else None, image_std=list(norm[1]) if norm else None,
                              do_reduce_labels=False)


def export_hf(model: nn.Module, out_dir: str | Path, rel_pos: str = "keep", class_names: list[str] | None = None,
              normalize: str = "imagenet") -> Path:
    """Write a transformers model folder: `config.json` (with ``id2label`` from ``class_names`` when known) +
    `model.safetensors` via `save_pretrained`, `preprocessor_config.json` (so `AutoImageProcessor` and
    ``pipeline("image-classification", model=out_dir)`` work) and a README.md model card: a folder
    `huggingface_hub.upload_folder` publishes as is."""
    from .hub import model_card

    out = Path(out_dir)
    hf = build_hf_model(model, rel_pos)
    n = getattr(hf.config, "num_labels", 0) if "classifier" in dict(hf.named_children()) else 0
    if class_names and n:
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names for a {n}-class head")
        hf.config.id2label = {i: str(c) for i, c in enumerate(class_names)}
        hf.config.label2id = {str(c): i for i, c in enumerate(class_names)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(str(tmp))
        image_processor(model, normalize).save_pretrained(str(tmp))
        usage = ("## Usage\n\n```python\nfrom transformers import pipeline\n\n"
                 f"classify = pipeline(\"{'image-classification' if n else 'image-feature-extraction'}\", "
                 "model=\"ORG/NAME\")\n```\n\n")
        (tmp / "README.md").write_text(model_card(type(hf).__name__, hf.config.to_diff_dict(), "transformers", usage))
        return move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
