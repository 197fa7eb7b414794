"""Frozen ViT backbones for evaluation: from a checkpoint of this project (`mim` pre-training -> its ViT without the
MIM head, `vit`, `vqkd` -> its encoder, as the official ``--model_filter_name encoder``, `segmenter` -> its ViT
without a final norm; any registered kind with a ViT backbone) or from an untrained named architecture (a baseline).
Fine-tuning reads its source here too (`read_source` with ``official=True`` also takes microsoft/unilm ``.pth`` files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..checkpoint import read_model_file, resolve_weights
from ..config import ConfigError, check, opt, reading
from ..interop.official import infer_vit_fields, read_official_state_dict
from ..models.architectures import get_architecture, list_architectures
from ..models.backbone import BEiTViT, ViTConfig
from ..models.registry import KINDS


@dataclass
class ModelSource:
    """Where the backbone comes from (``--model.*``)."""

    checkpoint: str = opt("", "beitv2 model file or checkpoint folder (kinds mim, vit, vqkd, segmenter); finetune also "
                              "reads official .pth files")
    filter: str = opt("", "'' = automatic (vqkd -> encoder), 'encoder' = keep the keys under 'encoder.' "
                          "(official --model_filter_name)")
    preset: str = opt("", "with random_init: the named architecture (beitv2.models.architectures) of an untrained "
                          "baseline")
    random_init: bool = opt(False, "use the untrained `preset` instead of a checkpoint")

    def validate(self, prefix: str = "model.") -> None:
        check(self.filter in ("", "encoder"), prefix + "filter", f"must be '' or 'encoder', got {self.filter!r}")
        if self.random_init:
            check(bool(self.preset), prefix + "preset", "name the architecture to initialise randomly")
            check(not self.checkpoint, prefix + "checkpoint", "give either a checkpoint or random_init, not both")
            check(self.preset in list_architectures(), prefix + "preset",
                  f"unknown architecture {self.preset!r} (known: {', '.join(list_architectures())})")
        else:
            check(not self.preset, prefix + "preset", "only used with random_init true (an untrained baseline)")
            check(bool(self.checkpoint), prefix + "checkpoint",
                  "required (or set random_init true with an architecture name for an untrained baseline)")
            check(os.path.exists(self.checkpoint) or self.checkpoint.startswith("hf-hub:"), prefix + "checkpoint",
                  f"not found: {self.checkpoint}")


class Backbone(NamedTuple):
    """A ViT backbone as read from its source, not built yet."""

    config: ViTConfig
    state: dict[str, torch.Tensor] | None  # None: random init
    description: str
    kind: str  # the file's kind ('' for a random init, 'official' for a microsoft/unilm file)


def read_source(src: ModelSource, official: bool = False) -> Backbone:
    """The backbone ``src`` names, read without building it: a random init of a named architecture, a beitv2 model file
    of any kind with a ViT backbone (`read_model_file` finds it), or (``official``: fine-tuning) a microsoft/unilm
    file."""
    if src.random_init:
        kind, cfg = get_architecture(src.preset)
        if KINDS[kind].backbone is None:
            known = ", ".join(k for k, s in KINDS.items() if s.backbone is not None)
            raise ConfigError(f"model.preset: architecture {src.preset!r} is a {kind!r} model; expected one with a ViT "
                              f"backbone ({known})")
        return Backbone(KINDS[kind].backbone_config(cfg), None, f"random init of architecture {src.preset}", "")
    with reading("model.checkpoint"):
        if official:
            path = resolve_weights(src.checkpoint)
            if path.suffix != ".safetensors":
                return _read_official(src, path)
        f = read_model_file(src.checkpoint, backbone=True)
    if src.filter == "encoder" and f.kind != "vqkd":
        raise ConfigError(f"model.filter: 'encoder' needs a vqkd checkpoint, {f.path} is a {f.kind!r} model")
    return Backbone(f.config, f.state, f.description, f.kind)


def _read_official(src: ModelSource, path: Path) -> Backbone:
    """An official microsoft/unilm .pth file (pre-training, classifier, or with filter 'encoder' a VQ-KD tokenizer),
    read and described by the interop helper (`beitv2.interop.official`)."""
    state = read_official_state_dict(path)
    what = f"official checkpoint {src.checkpoint}"
    if src.filter == "encoder":  # official --model_filter_name encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not state:
            raise ConfigError(f"model.filter: {src.checkpoint} has no 'encoder.' keys")
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    fields, _ = infer_vit_fields(state, what)
    return Backbone(ViTConfig(**fields), state, what, "official")


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
