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

The folder's `preprocessor_config.json` is a `BeitImageProcessor` with the model's own evaluation preprocessing
(`beitv2.interop.preprocessing`). transformers' image pipeline converts every image to RGB, so a 1-channel model is
exported with a 3-channel patch embedding reading the luma of the RGB input. Before anything is written, the
transformers model's own forward is compared with ours on a fixed batch; an export that does not reproduce it is
refused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models.backbone import ViTConfig
from .hub import model_card
from .preprocessing import PIL_RESAMPLE, Preprocessing, luma_patch_weight, preprocessing_of
from .timm_export import backbone_of, check_export, move_into

REL_POS_CHOICES = ("keep", "per_layer")


def hf_config(cfg: ViTConfig, rel_pos: str = "keep", *, rgb_input: bool = False, **extra: Any) -> Any:
    """A `transformers.BeitConfig` describing ``cfg`` exactly (LayerNorm eps 1e-6, GELU, no dropout); ``extra``
    adds fields (the segmentation heads'); ``rgb_input``: a 1-channel model taking RGB (`to_hf_state_dict`)."""
    from transformers import BeitConfig

    if rel_pos not in REL_POS_CHOICES:
        raise ValueError(f"rel_pos must be one of {REL_POS_CHOICES}, got {rel_pos!r}")
    h, w = cfg.img_hw
    if h != w and (cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias):
        raise ValueError(f"transformers' BEiT handles relative position tables of square windows only; this model "
                         f"is {h}x{w}")
    per_layer = cfg.use_rel_pos_bias or (cfg.use_shared_rel_pos_bias and rel_pos == "per_layer")
    kw: dict[str, Any] = dict(
        image_size=h, patch_size=cfg.patch_size, num_channels=3 if rgb_input else cfg.in_chans,
        hidden_size=cfg.embed_dim,
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


def to_hf_state_dict(model: nn.Module, rel_pos: str = "keep", rgb_input: bool = False
                     ) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict with transformers' names, BeitConfig). With a head the names are those of
    `BeitForImageClassification`, otherwise of `BeitModel`. ``rgb_input`` (1-channel models only): the patch
    embedding reads the luma of a 3-channel input (`preprocessing.luma_patch_weight`)."""
    cfg, state = backbone_of(model)
    if rgb_input:
        if cfg.in_chans != 1:
            raise ValueError(f"rgb_input applies to 1-channel models; this one has {cfg.in_chans} channels")
        state["patch_embed.proj.weight"] = luma_patch_weight(state["patch_embed.proj.weight"])
    config = hf_config(cfg, rel_pos, rgb_input=rgb_input)
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


def build_hf_model(model: nn.Module, rel_pos: str = "keep", rgb_input: bool = False) -> nn.Module:
    """The transformers model holding ``model``'s weights, loaded strictly (any key drift raises here)."""
    from transformers import BeitForImageClassification, BeitModel

    state, config = to_hf_state_dict(model, rel_pos, rgb_input)
    hf_cls = BeitForImageClassification if "classifier.weight" in state else BeitModel
    hf = hf_cls(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the key map does not fit the installed transformers {hf_cls.__name__}: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return hf.eval()


def image_processor(model: nn.Module, normalize: str = "imagenet") -> Any:
    """A `BeitImageProcessor` resizing to the model's size (no crop), [0, 1], then ``normalize`` (a VQ-KD encoder
    always sees its own statistics); the segmentation export's processor."""
    from transformers import BeitImageProcessor

    pre = preprocessing_of(model, normalize)
    h, w = pre.img_hw
    stats = pre.export_mean_std()  # every image converted to RGB: a 1-channel model's export reads its luma
    return BeitImageProcessor(do_resize=True, size={"height": h, "width": w}, resample=3, do_center_crop=False,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=stats is not None,
                              image_mean=stats[0] if stats else None, image_std=stats[1] if stats else None,
                              do_reduce_labels=False, do_convert_rgb=True)


def classification_image_processor(pre: Preprocessing) -> Any:
    """A `BeitImageProcessor` doing ``pre``: shorter side to ``pre.resize_size`` (or no resize), centre crop to the
    model's size, [0, 1], normalise; every image converted to RGB (a 1-channel model's export reads its luma)."""
    from transformers import BeitImageProcessor

    h, w = pre.img_hw
    stats = pre.export_mean_std()
    return BeitImageProcessor(do_resize=pre.resize, size={"shortest_edge": pre.resize_size},
                              resample=PIL_RESAMPLE[pre.interpolation], do_center_crop=True,
                              crop_size={"height": h, "width": w}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=stats is not None, image_mean=stats[0] if stats else None,
                              image_std=stats[1] if stats else None, do_reduce_labels=False, do_convert_rgb=True)


def _hf_output(hf: nn.Module, x: torch.Tensor) -> torch.Tensor:
    res = hf(pixel_values=x)
    return res.logits if hasattr(res, "logits") else res.pooler_output


def export_hf(model: nn.Module, out_dir: str | Path, rel_pos: str = "keep", class_names: list[str] | None = None,
              normalize: str | None = None, preprocessing: Preprocessing | None = None) -> Path:
    """Write a transformers model folder: `config.json` (with ``id2label`` from ``class_names`` when known) +
    `model.safetensors` via `save_pretrained`, `preprocessor_config.json` with ``preprocessing`` (default:
    `preprocessing_of(model, normalize)`; so `AutoImageProcessor` and ``pipeline("image-classification",
    model=out_dir)`` feed the model what it was trained on) and a README.md model card: a folder
    `huggingface_hub.upload_folder` publishes as is."""
    pre = preprocessing or preprocessing_of(model, normalize)
    rgb = pre.in_chans == 1
    out = Path(out_dir)
    hf = build_hf_model(model, rel_pos, rgb)
    check_export(model, hf, "the transformers export", rgb, _hf_output)
    n = getattr(hf.config, "num_labels", 0) if "classifier" in dict(hf.named_children()) else 0
    if class_names and n:
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names for a {n}-class head")
        hf.config.id2label = {i: str(c) for i, c in enumerate(class_names)}
        hf.config.label2id = {str(c): i for i, c in enumerate(class_names)}
    hf.config.beitv2_trained_in_chans = pre.in_chans
    hf.config.beitv2_normalize = pre.normalize
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(str(tmp))
        classification_image_processor(pre).save_pretrained(str(tmp))
        gray = ("The model was trained on 1-channel (grayscale) images. This export takes RGB input: its patch "
                "embedding computes the luma (ITU-R 601-2, as PIL's `convert('L')`), so gray and colour images both "
                "work.\n\n") if rgb else ""
        usage = ("## Usage\n\n```python\nfrom transformers import pipeline\n\n"
                 f"classify = pipeline(\"{'image-classification' if n else 'image-feature-extraction'}\", "
                 "model=\"ORG/NAME\")\n```\n\n" + gray)
        (tmp / "README.md").write_text(model_card(type(hf).__name__, hf.config.to_diff_dict(), "transformers", usage))
        return move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
