"""Frozen ViT backbones for evaluation: from a checkpoint of this project (`mim` pre-training -> its ViT without the
MIM head, `vit`, `vqkd` -> its encoder, as the official ``--model_filter_name encoder``, `segmenter` -> its ViT
without a final norm; any registered kind with a ViT backbone) or from an untrained preset (a baseline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..checkpoint import ModelFile, read_model_file
from ..config import ConfigError, check, opt, reading
from ..models.backbone import BEiTViT, ViTConfig
from ..models.presets import get_preset, list_presets
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
            check(self.preset in list_presets(), prefix + "preset",
                  f"unknown preset {self.preset!r} (known: {', '.join(list_presets())})")
        else:
            check(not self.preset, prefix + "preset", "only used with random_init true (an untrained baseline)")
            check(bool(self.checkpoint), prefix + "checkpoint",
                  "required (or set random_init true with a preset for an untrained baseline)")
            check(os.path.exists(self.checkpoint) or self.checkpoint.startswith("hf-hub:"), prefix + "checkpoint",
                  f"not found: {self.checkpoint}")


class Backbone(NamedTuple):
    """A ViT backbone as read from its source, not built yet."""

    config: ViTConfig
    state: dict[str, torch.Tensor] | None  # None: random init
    description: str
    kind: str  # the file's kind ('' for a random init)


def with_vit_backbone(kind: str, field: str, where: str) -> ModelKind:
    """The registered kind ``kind`` if it has a ViT backbone, else a ConfigError naming ``field``."""
    spec = get_kind(kind) if kind in kinds() else None
    if spec is None or spec.backbone is None:
        known = ", ".join(k for k in kinds() if get_kind(k).backbone is not None)
        raise ConfigError(f"{field}: {where} is a {kind!r} model; expected one with a ViT backbone ({known})")
    return spec


def backbone_of_file(f: ModelFile, filt: str = "") -> Backbone:
    """The ViT config and weights inside a beitv2 model file of any kind with a ViT backbone (the registry says
    where it sits: a VQ-KD's encoder, a MIM model without its pre-training head, ...)."""
    if filt == "encoder" and f.kind != "vqkd":
        raise ConfigError(f"model.filter: 'encoder' needs a vqkd checkpoint, {f.path} is a {f.kind!r} model")
    spec = with_vit_backbone(f.kind, "model.checkpoint", str(f.path))
    return Backbone(spec.backbone_config(f.config), spec.backbone_state(f.state), f.describe(), f.kind)


def read_source(src: ModelSource) -> Backbone:
    """The backbone ``src`` names, read without building it: a random init of a preset, or a beitv2 model file."""
    if src.random_init:
        kind, cfg = get_preset(src.preset)
        cfg = with_vit_backbone(kind, "model.preset", f"preset {src.preset!r}").backbone_config(cfg)
        return Backbone(cfg, None, f"random init of preset {src.preset}", "")
    with reading("model.checkpoint"):
        f = read_model_file(src.checkpoint)
    return backbone_of_file(f, src.filter)


# kinds whose backbone has no final LayerNorm (a segmenter reads the raw block outputs, as the official UperNet does):
# their backbone is evaluated without one rather than with a freshly initialised norm
NO_FINAL_NORM = ("segmenter",)


def load_backbone(src: ModelSource) -> tuple[BEiTViT, str]:
    """A frozen ViT (eval mode, no gradients, no classifier) and a description of where it came from."""
    cfg, state, desc, kind = read_source(src)
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
