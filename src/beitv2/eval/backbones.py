"""Frozen ViT backbones for evaluation: from a checkpoint of this project (`mim` pre-training -> its ViT without the
MIM head, `vit`, `vqkd` -> its encoder, as the official ``--model_filter_name encoder``, `segmenter` -> its ViT
without a final norm; any registered kind with a ViT backbone) or from an untrained preset (a baseline).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, check, opt, reading
from ..models.backbone import BEiTViT, ViTConfig
from ..models.registry import ModelKind, get_kind, kinds


@dataclass
class ModelSource:
    """Where the backbone comes from (``--model.*``)."""

    checkpoint: str = opt("", "beitv2 model file or checkpoint folder (kinds mim, vit, vqkd, segmenter); finetune also "
                              "reads official .pth files")
    filter: str = opt("", "'' = automatic (vqkd -> encoder), 'encoder' = keep the keys under 'encoder.' "
                          "(official --model_filter_name)")
    preset: str = opt("", "with random_init: an untrained preset as a baseline (beitv2.models.presets)")
    random_init: bool = opt(False, "use the untrained `preset` instead of a checkpoint")

    def validate(self, prefix: str = "model.") -> None:
        check(self.filter in ("", "encoder"), prefix + "filter", f"must be '' or 'encoder', got {self.filter!r}")
        if self.random_init:
            check(bool(self.preset), prefix + "preset", "name the preset to initialise randomly")
            check(not self.checkpoint, prefix + "checkpoint", "give either a checkpoint or random_init, not both")
            from ..models.presets import list_presets

            check(self.preset in list_presets(), prefix + "preset",
                  f"unknown preset {self.preset!r} (known: {', '.join(list_presets())})")
        else:
            check(not self.preset, prefix + "preset", "only used with random_init true (an untrained baseline)")
            check(bool(self.checkpoint), prefix + "checkpoint",
                  "required (or set random_init true with a preset for an untrained baseline)")
            check(os.path.exists(self.checkpoint) or self.checkpoint.startswith("hf-hub:"), prefix + "checkpoint",
                  f"not found: {self.checkpoint}")


def _with_backbone(kind: str, field: str, where: str) -> ModelKind:
    spec = get_kind(kind) if kind in kinds() else None
    if spec is None or spec.backbone is None:
        known = ", ".join(k for k in kinds() if get_kind(k).backbone is not None)
        raise ConfigError(f"{field}: {where} is a {kind!r} model; expected one with a ViT backbone ({known})")
    return spec


def backbone_from_kind(kind: str, cfg_dict: dict, state: dict[str, torch.Tensor], filt: str, where: str
                       ) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(ViT config, ViT state dict) of a beitv2 model file of any kind with a ViT backbone (the registry says where
    it sits: a VQ-KD's encoder, a MIM model without its pre-training head, ...)."""
    from ..config import from_dict

    if filt == "encoder" and kind != "vqkd":
        raise ConfigError(f"model.filter: 'encoder' needs a vqkd checkpoint, {where} is a {kind!r} model")
    spec = _with_backbone(kind, "model.checkpoint", where)
    return spec.backbone_config(from_dict(spec.config_class, cfg_dict)), spec.backbone_state(state)


# kinds whose backbone has no final LayerNorm (a segmenter reads the raw block outputs, as the official UperNet does):
# their backbone is evaluated without one rather than with a freshly initialised norm
NO_FINAL_NORM = ("segmenter",)


def read_source(src: ModelSource) -> tuple[ViTConfig, dict[str, torch.Tensor] | None, str]:
    """(ViT config, weights or None for random init, description) without building the model."""
    cfg, state, desc, _ = _read_source(src)
    return cfg, state, desc


def _read_source(src: ModelSource) -> tuple[ViTConfig, dict[str, torch.Tensor] | None, str, str]:
    """`read_source` and the file's kind ('' for a random init)."""
    if src.random_init:
        from ..models.presets import get_preset

        kind, cfg = get_preset(src.preset)
        cfg = _with_backbone(kind, "model.preset", f"preset {src.preset!r}").backbone_config(cfg)
        return cfg, None, f"random init of preset {src.preset}", ""
    from ..checkpoint import load_state_dict, read_metadata, resolve_weights

    with reading("model.checkpoint"):
        path = resolve_weights(src.checkpoint)
        if path.suffix != ".safetensors":
            raise ConfigError(f"model.checkpoint: {path} is not a beitv2 safetensors file (official .pth files: use "
                              "`beitv2 convert` first, or `beitv2 finetune`)")
        meta = read_metadata(path)
        if "kind" not in meta or "config" not in meta:
            raise ConfigError(f"model.checkpoint: {path} has no beitv2 metadata (kind/config)")
        cfg, state = backbone_from_kind(meta["kind"], json.loads(meta["config"]), load_state_dict(path), src.filter,
                                        str(path))
    return cfg, state, f"{meta['kind']} checkpoint {path}", meta["kind"]


def load_backbone(src: ModelSource) -> tuple[BEiTViT, str]:
    """A frozen ViT (eval mode, no gradients, no classifier) and a description of where it came from."""
    cfg, state, desc, kind = _read_source(src)
    cfg.num_classes = 0
    model = BEiTViT(cfg)
    if kind in NO_FINAL_NORM:
        model.norm, model.fc_norm = nn.Identity(), nn.Identity()
        desc += " (no final norm: the raw block outputs its heads read)"
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        with reading("model.checkpoint"):
            missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"model.checkpoint: {desc}: weights do not match its ViT config: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
    model.eval().requires_grad_(False)
    return model, desc
