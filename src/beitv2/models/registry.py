"""The one place that knows each model kind.

A *kind* is the name a model file carries in its metadata (``kind`` beside ``config``). Each kind declares once:

* ``config_class`` and ``model_class`` (how a file is rebuilt: ``model_class(config_class(**config))``);
* ``backbone``: the field of its config that holds its ViT backbone's config (``""``: the config is itself a
  `ViTConfig`; ``None``: no ViT, e.g. the dVAE), and ``backbone_prefix``, where the backbone's weights sit in its
  state dict (``encoder.`` for VQ-KD). Both are plain data, so a file's backbone is read without building its model
  (`beitv2.checkpoint.read_model_file` with ``backbone=True``);
* ``pretrain_only_keys``: state-dict prefixes that exist only for pre-training (the MIM head) and are dropped when the
  backbone is reused for evaluation, fine-tuning or export;
* ``tokens``: for tokenizers (VQ-KD, dVAE), the `TokenGrid` their codes form, read from the config alone.

Every model exposes ``model.config``: the config of its own kind (`MIMConfig` for `BEiTv2ForMIM`, whose
``config.backbone`` is its ViT's; every `BEiTViT` also names its ViT config ``vit_config``). Checkpoint files,
architectures, evaluation, fine-tuning, interop and the trainer read from here (`KINDS` is the table itself,
read-only), so a new kind is one `register` call::

    register(ModelKind("segmenter", SegmenterConfig, Segmenter, backbone="backbone", backbone_prefix="backbone."))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .backbone import BEiTViT, ViTConfig
from .dvae import DiscreteVAE, DVAEConfig
from .mim import BEiTv2ForMIM, MIMConfig
from .segmenter import Segmenter, SegmenterConfig
from .timm_net import TimmNet, TimmNetConfig
from .vqkd import VQKD, VQKDConfig


class TokenGrid(NamedTuple):
    """What a tokenizer's codes are: a ``grid`` of codes out of ``vocab_size``, for ``img_size`` images of
    ``in_chans`` channels."""

    grid: tuple[int, int]
    vocab_size: int
    img_size: tuple[int, int]
    in_chans: int


@dataclass(frozen=True)
class ModelKind:
    name: str
    config_class: type
    model_class: type[nn.Module]
    constructor: Callable[[Any], nn.Module] | None = None  # config -> model (default: model_class(config))
    backbone: str | None = None  # the config field holding the ViT backbone's config ("": the config itself)
    backbone_prefix: str = ""  # where the backbone's weights sit in the state dict
    pretrain_only_keys: tuple[str, ...] = ()  # state-dict prefixes dropped when reusing the backbone
    tokens: Callable[[Any], TokenGrid] | None = None  # tokenizers: config -> the grid of codes they make

    def build(self, config: Any) -> nn.Module:
        return (self.constructor or self.model_class)(config)

    def backbone_config(self, config: Any) -> ViTConfig:
        if self.backbone is None:
            raise ValueError(f"a {self.name} model has no ViT backbone")
        return getattr(config, self.backbone) if self.backbone else config

    def backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone's weights out of a full state dict of this kind: under ``backbone_prefix`` (stripped),
        without the pre-training-only keys."""
        p = self.backbone_prefix
        return {k[len(p):]: v for k, v in state.items()
                if k.startswith(p) and not k[len(p):].startswith(self.pretrain_only_keys)}


_KINDS: dict[str, ModelKind] = {}
KINDS: Mapping[str, ModelKind] = MappingProxyType(_KINDS)  # every registered kind by name (read-only)


def register(kind: ModelKind) -> ModelKind:
    old = _KINDS.get(kind.name)
    if old is not None and old.model_class.__qualname__ != kind.model_class.__qualname__:
        raise ValueError(f"model kind {kind.name!r} is already registered for {old.model_class.__name__}")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[str]:
    return list(_KINDS)


def get_kind(name: str) -> ModelKind:
    if name not in _KINDS:
        raise KeyError(f"unknown model kind {name!r} (known: {', '.join(_KINDS)})")
    return _KINDS[name]


def kind_of(model: nn.Module) -> ModelKind:
    """The kind whose model class is exactly ``type(model)``."""
    for kind in _KINDS.values():
        if type(model) is kind.model_class:
            return kind
    raise TypeError(f"no model kind registered for {type(model).__name__}")


def build(kind: str, config: Any) -> nn.Module:
    return get_kind(kind).build(config)


def backbone_config(model: nn.Module) -> ViTConfig:
    """The ViT backbone config of a model of any registered kind."""
    return kind_of(model).backbone_config(model.config)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ViT backbone's weights of a model of any registered kind (no pre-training-only keys)."""
    return kind_of(model).backbone_state(model.state_dict())


register(ModelKind("vit", ViTConfig, BEiTViT, backbone=""))
register(ModelKind("mim", MIMConfig, BEiTv2ForMIM, backbone="backbone",
                   pretrain_only_keys=BEiTv2ForMIM.pretrain_only_keys))
register(ModelKind("vqkd", VQKDConfig, VQKD, backbone="encoder", backbone_prefix="encoder.",
                   tokens=lambda c: TokenGrid(c.encoder.grid_size, c.quantizer.num_codes, c.encoder.img_hw,
                                              c.encoder.in_chans)))
register(ModelKind("dvae", DVAEConfig, DiscreteVAE,
                   tokens=lambda c: TokenGrid(c.grid_size, c.vocab_size, (c.img_size, c.img_size), c.in_chans)))
register(ModelKind("segmenter", SegmenterConfig, Segmenter, backbone="backbone", backbone_prefix="backbone."))
register(ModelKind("timm", TimmNetConfig, TimmNet))  # no ViT backbone: a stand-in teacher (models/timm_net.py)
