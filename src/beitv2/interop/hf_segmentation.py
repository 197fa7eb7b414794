"""A `Segmenter` to and from a transformers `BeitForSemanticSegmentation` folder.

The backbone uses the key map of `beitv2.interop.hf_export` under ``beit.``; the pyramid and heads are renamed to
transformers' current module names (checked by a strict ``load_state_dict`` before saving):

    fpn1.0 / fpn1.1 / fpn1.3 / fpn2.0             -> fpn.fpn1.conv_transpose1 / .normalization / .conv_transpose2,
                                                     fpn.fpn2
    decode_head.psp_modules.i.1.{conv, batch_norm} -> decode_head.psp_modules.blocks.i.conv.{convolution,
                                                     normalization}
    decode_head.bottleneck                         -> decode_head.psp_bottleneck
    *.conv / *.batch_norm (UperNet conv modules)   -> *.convolution / *.normalization

transformers' UperNet head is as wide as the backbone (``channels`` = embed_dim, the official choice), its four
``out_indices`` must differ, and its FCN head reads the third level: models outside that are refused by name.

Tap numbering. Our ``out_indices`` are block numbers (k = output of the k-th block, 1-based, as the official mmseg
code; 0 = the patch embedding). transformers' model reads ``hidden_states[i - 1]`` for its out_index i, where
``hidden_states[0]`` is the patch embedding and ``hidden_states[k]`` block k's output, and it accepts i in
0..depth only. So:

* import: block = (i - 1) mod (depth + 1), Python's reading of a negative index included; the published ADE20K
  checkpoints (depth 12, out_indices 3 5 7 11) become taps 2 4 6 10, which the segmenter runs as transformers does;
* export: i = block + 1. A model tapping its last block (the official layout, e.g. 4 6 8 12) has no transformers
  form: transformers would read other blocks and give other logits, so the export is refused with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.backbone import ViTConfig
from ..models.segmenter import Segmenter, SegmenterConfig
from .hf_export import hf_config, image_processor, to_hf_state_dict
from .timm_export import move_into

_HEAD_RULES = [
    (r"^fpn1\.0\.", "fpn.fpn1.conv_transpose1."), (r"^fpn1\.1\.", "fpn.fpn1.normalization."),
    (r"^fpn1\.3\.", "fpn.fpn1.conv_transpose2."), (r"^fpn2\.0\.", "fpn.fpn2."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"decode_head.psp_modules.blocks.\1.conv.convolution."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.batch_norm\.", r"decode_head.psp_modules.blocks.\1.conv.normalization."),
    (r"^decode_head\.bottleneck\.conv\.", "decode_head.psp_bottleneck.convolution."),
    (r"^decode_head\.bottleneck\.batch_norm\.", "decode_head.psp_bottleneck.normalization."),
    (r"\.conv\.", ".convolution."), (r"\.batch_norm\.", ".normalization."),
]
_HEAD_RULES_BACK = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."), (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."), (r"^fpn\.fpn2\.", "fpn2.0."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r"decode_head.psp_modules.\1.1.conv."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r"decode_head.psp_modules.\1.1.batch_norm."),
    (r"^decode_head\.psp_bottleneck\.convolution\.", "decode_head.bottleneck.conv."),
    (r"^decode_head\.psp_bottleneck\.normalization\.", "decode_head.bottleneck.batch_norm."),
    (r"\.convolution\.", ".conv."), (r"\.normalization\.", ".batch_norm."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    """The first matching rule renames ``key`` (keys without a match keep their name)."""
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def hf_out_indices(cfg: SegmenterConfig) -> list[int]:
    """transformers' out_indices reading the same blocks as ``cfg`` (block number + 1); ValueError when there are
    none (see the module docstring)."""
    idx, depth = list(cfg.indices), cfg.backbone.depth
    if len(set(idx)) != 4:
        raise ValueError(f"out_indices: transformers needs four different blocks, this model taps {idx}")
    if depth in idx:
        raise ValueError(f"out_indices: this model taps blocks {idx} and transformers' BeitForSemanticSegmentation "
                         f"cannot read the last block ({depth}): it reads hidden_states[i - 1] for out_index i <= "
                         f"{depth}, so out_indices {idx} would feed it blocks {[i - 1 for i in idx]}; train with taps "
                         f"before the last block (e.g. --model.out_indices {' '.join(str(i - 1) for i in idx)}) "
                         f"to export")
    return [i + 1 for i in idx]


def out_indices_from_hf(out_indices: list[int], depth: int) -> tuple[int, ...]:
    """Our block numbers for transformers' out_indices: hidden_states[i - 1] is block (i - 1) mod (depth + 1)."""
    return tuple((int(i) - 1) % (depth + 1) for i in out_indices)


def hf_segmentation_config(cfg: SegmenterConfig, class_names: list[str] | None = None) -> Any:
    """The `BeitConfig` of ``cfg``; raises ValueError naming what transformers cannot hold. A 1-channel segmenter
    is exported taking RGB and reading its luma, as the classification export does (transformers' pipeline hands
    every image over as RGB)."""
    if cfg.width != cfg.backbone.embed_dim:
        raise ValueError(f"channels: transformers' BeitForSemanticSegmentation has UperNet width = embed_dim "
                         f"({cfg.backbone.embed_dim}); this model has {cfg.width}")
    idx = hf_out_indices(cfg)
    names = class_names if class_names and len(class_names) == cfg.num_classes else \
        [str(i) for i in range(cfg.num_classes)]
    return hf_config(
        cfg.backbone, "per_layer", rgb_input=cfg.backbone.in_chans == 1, num_labels=cfg.num_classes,
        out_indices=idx, pool_scales=list(cfg.pool_scales),
        use_auxiliary_head=cfg.use_auxiliary_head, auxiliary_loss_weight=cfg.auxiliary_loss_weight,
        auxiliary_channels=cfg.auxiliary_channels, auxiliary_num_convs=cfg.auxiliary_num_convs,
        auxiliary_concat_input=cfg.auxiliary_concat_input, semantic_loss_ignore_index=cfg.ignore_index,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def to_hf_segmentation_state_dict(model: Segmenter, class_names: list[str] | None = None
                                  ) -> tuple[dict[str, torch.Tensor], Any]:
    config = hf_segmentation_config(model.config, class_names)
    backbone, _ = to_hf_state_dict(model.backbone, "per_layer", rgb_input=model.config.backbone.in_chans == 1)
    out = {f"beit.{k}": v for k, v in backbone.items()}
    for k, v in model.state_dict().items():
        if not k.startswith("backbone."):
            out[_rename(k, _HEAD_RULES)] = v.detach().cpu().contiguous()
    return out, config


def build_hf_segmentation_model(model: Segmenter, class_names: list[str] | None = None) -> nn.Module:
    """The transformers model holding ``model``'s weights, loaded strictly (any key drift raises here)."""
    from transformers import BeitForSemanticSegmentation

    state, config = to_hf_segmentation_state_dict(model, class_names)
    hf = BeitForSemanticSegmentation(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise RuntimeError(f"the key map does not fit the installed transformers BeitForSemanticSegmentation: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return hf.eval()


def segmentation_image_processor(model: Segmenter, normalize: str = "imagenet", reduce_labels: bool = False) -> Any:
    """A `BeitImageProcessor` resizing to the segmenter's input size (its position tables are built for that grid)
    and normalising as in training; ``do_reduce_labels`` as the training data (ADE20K: 0 = other, ignored)."""
    proc = image_processor(model, normalize)
    proc.do_reduce_labels = bool(reduce_labels)
    return proc


def _model_card(config: Any, names: list[str], normalize: str, reduce_labels: bool, cfg: SegmenterConfig) -> str:
    h, w = cfg.backbone.img_hw
    labels = ("annotation 0 ('other') ignored, class k = annotation k + 1 (do_reduce_labels)" if reduce_labels
              else "class k = annotation k")
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    front = "\n".join(["---", "library_name: transformers", "pipeline_tag: image-segmentation", "tags:", "- beitv2",
                       "- beit", "- semantic-segmentation", "- upernet", "---"])
    return (f"{front}\n\n# BEiT UperNet semantic segmentation ({len(names)} classes)\n\n"
            f"Trained with [beitv2](https://pypi.org/project/beitv2/) (`beitv2 segment`) and exported with "
            f"`beitv2 convert --to hf`: a BEiT ViT (depth {cfg.backbone.depth}, width {cfg.backbone.embed_dim}, "
            f"patch {cfg.backbone.patch_size}), the simple feature pyramid and a UperNet head"
            f"{' with an FCN auxiliary head (training only)' if cfg.use_auxiliary_head else ''}.\n\n"
            f"* input: {h} x {w} pixels, normalisation `{normalize}` (preprocessor_config.json does both)\n"
            f"* pyramid taps: the outputs of blocks {list(cfg.indices)} (1-based); transformers' `out_indices` "
            f"{list(config.out_indices)} read `hidden_states[i - 1]`, the same blocks\n"
            f"* labels: {labels}; ignore index {cfg.ignore_index}\n"
            f"* classes: {shown}\n\n"
            "## Usage\n\n```python\nfrom transformers import pipeline\n\n"
            "segment = pipeline(\"image-segmentation\", model=\"ORG/NAME\")\n"
            "for region in segment(\"image.png\"):\n    print(region[\"label\"], region[\"mask\"].size)\n```\n\n"
            "The model runs at its training size; the pipeline resizes the image to it and the logits back.\n")


def export_hf_segmentation(model: Segmenter, out_dir: str | Path, class_names: list[str] | None = None,
                           normalize: str = "imagenet", reduce_labels: bool = False) -> Path:
    """Write a `BeitForSemanticSegmentation` folder: `config.json` (with ``id2label`` / ``label2id``) +
    `model.safetensors` via `save_pretrained`, `preprocessor_config.json` (for `AutoImageProcessor` and
    ``pipeline("image-segmentation", model=out_dir)``) and a README.md model card."""
    out = Path(out_dir)
    if class_names is not None and len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.config.num_classes}-class segmenter")
    hf = build_hf_segmentation_model(model, class_names)
    names = [hf.config.id2label[i] for i in range(model.config.num_classes)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(str(tmp))
        segmentation_image_processor(model, normalize, reduce_labels).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(hf.config, names, normalize, reduce_labels, model.config))
        return move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recorded_export_options(metadata: dict[str, str]) -> dict[str, Any]:
    """``export_hf_segmentation``'s class_names / normalize / reduce_labels as `beitv2 segment` recorded them in the
    model file's metadata; nothing recorded: numbered classes, ImageNet statistics, labels as they are."""
    names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    return {"class_names": list(names) if names else None,
            "normalize": metadata.get("normalize", "imagenet"),
            "reduce_labels": metadata.get("reduce_zero_label", "false") == "true"}


# ------------------------------------------------------------------------------------------------------ import

def segmenter_config_from_hf(config: Any) -> SegmenterConfig:
    if config.hidden_act != "gelu":
        raise ValueError(f"hidden_act: only gelu BEiT models can be imported, got {config.hidden_act!r}")
    size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    rel = bool(config.use_relative_position_bias or config.use_shared_relative_position_bias)
    bb = ViTConfig(img_size=(size,) if isinstance(size, int) else size, patch_size=patch,
                   in_chans=config.num_channels, embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                   num_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size / config.hidden_size,
                   init_values=float(config.layer_scale_init_value), drop_path_rate=float(config.drop_path_rate),
                   use_abs_pos_emb=bool(config.use_absolute_position_embeddings), use_rel_pos_bias=rel,
                   use_shared_rel_pos_bias=False, use_mean_pooling=True)
    taps = out_indices_from_hf(list(config.out_indices), bb.depth)
    if list(taps) != sorted(taps):
        raise ValueError(f"out_indices: transformers' out_indices {list(config.out_indices)} read blocks {list(taps)}, "
                         f"out of depth order, which the segmenter does not hold")
    return SegmenterConfig(backbone=bb, num_classes=config.num_labels, out_indices=taps,
                           channels=0, pool_scales=tuple(config.pool_scales),
                           use_auxiliary_head=bool(config.use_auxiliary_head),
                           auxiliary_channels=config.auxiliary_channels,
                           auxiliary_num_convs=config.auxiliary_num_convs,
                           auxiliary_concat_input=bool(config.auxiliary_concat_input),
                           auxiliary_loss_weight=float(config.auxiliary_loss_weight),
                           ignore_index=int(config.semantic_loss_ignore_index))


def _backbone_from_hf(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias"}
    block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "lambda_1": "gamma_1", "lambda_2": "gamma_2",
             "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
             "attention.q_proj.bias": "attn.q_bias", "attention.v_proj.bias": "attn.v_bias"}
    shared = state.get("shared_position_bias.relative_position_bias_table")
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if rest.startswith("attention.") and rest.endswith("_proj.weight") and rest[10] in "qkv":
                continue
            mod, _, leaf = rest.rpartition(".")
            if rest in block:
                out[f"blocks.{i}.{block[rest]}"] = v
            elif mod in block:
                out[f"blocks.{i}.{block[mod]}.{leaf}"] = v
            else:
                raise KeyError(f"no beitv2 name for beit.{k}")
        elif k != "shared_position_bias.relative_position_bias_table" and not k.endswith("relative_position_index"):
            raise KeyError(f"no beitv2 name for beit.{k}")
    for i in range(depth):
        qkv = [state[f"layers.{i}.attention.{n}_proj.weight"] for n in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv, dim=0)
        if shared is not None:
            out[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    return out


def import_hf_segmentation(path: str | Path) -> tuple[Segmenter, list[str]]:
    """A `Segmenter` (eval mode) and its class names from a `BeitForSemanticSegmentation` folder."""
    from transformers import BeitConfig

    path = Path(path)
    config = BeitConfig.from_pretrained(str(path))
    cfg = segmenter_config_from_hf(config)
    model = Segmenter(cfg)
    from transformers import BeitForSemanticSegmentation

    hf = BeitForSemanticSegmentation.from_pretrained(str(path))  # applies transformers' own legacy key renames
    state = hf.state_dict()
    ours = {f"backbone.{k}": v for k, v in _backbone_from_hf(
        {k[len("beit."):]: v for k, v in state.items() if k.startswith("beit.")}, cfg.backbone.depth).items()}
    for k, v in state.items():
        if not k.startswith("beit."):
            ours[_rename(k, _HEAD_RULES_BACK)] = v
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the segmenter: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}")
    id2label = hf.config.id2label or {}
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(cfg.num_classes)]
    return model.eval(), names
