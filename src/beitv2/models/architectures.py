"""Named architectures: the paper's models and small ones for 28-64 px images on a CPU.

`ARCHITECTURES` is the one table of named architectures (the dVAE's, defined beside the dVAE in
`DVAE_ARCHITECTURES`, are part of it). `get_architecture(name)` returns (kind, config); `build_model(name,
**overrides)` builds it through the model registry, with config fields replaced. These are model names, not the
training recipes (YAML files in `beitv2/configs/`, the commands' ``--preset``). The paper's architectures reproduce
the official registered models (microsoft/unilm beit2: `vqkd_encoder_base_decoder_*`, `beit_*_patch16_224_8k_vocab`);
their learnable parameter counts are tested against the official numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..config import from_dict, validate_config
from .backbone import ViTConfig
from .dvae import DVAE_ARCHITECTURES
from .mim import MIMConfig
from .quantizer import QuantizerConfig
from .registry import build
from .vqkd import VQKDConfig, vqkd_encoder_config


def _vit(size: str, **kw) -> ViTConfig:
    dims = {"base": (768, 12, 12), "large": (1024, 24, 16)}[size]
    return ViTConfig(**{"embed_dim": dims[0], "depth": dims[1], "num_heads": dims[2], **kw})


def _vqkd(decoder_depth: int, teacher_dim: int) -> VQKDConfig:
    return VQKDConfig(encoder=vqkd_encoder_config(), decoder_depth=decoder_depth, teacher_dim=teacher_dim)


def _mim(size: str, early: int, init_values: float, aggregation: bool = True) -> MIMConfig:
    return MIMConfig(backbone=_vit(size, init_values=init_values, drop_path_rate=0.1), vocab_size=8192,
                     patch_aggregation=aggregation, early_layers=early, head_layers=2, shared_lm_head=True)


def _small_vit(img: int, width: int, depth: int, heads: int, chans: int = 3, **kw) -> dict[str, Any]:
    return dict(img_size=(img,), patch_size=4, in_chans=chans, embed_dim=width, depth=depth, num_heads=heads, **kw)


ARCHITECTURES: dict[str, Callable[[], tuple[str, Any]]] = {
    # --- the paper's tokenizers (official model names)
    "vqkd_encoder_base_decoder_1x768x12_clip": lambda: ("vqkd", _vqkd(1, 512)),
    "vqkd_encoder_base_decoder_3x768x12_clip": lambda: ("vqkd", _vqkd(3, 512)),
    "vqkd_encoder_base_decoder_1x768x12_dino": lambda: ("vqkd", _vqkd(1, 768)),
    # --- the paper's pre-training models
    "beitv2_base_patch16_224": lambda: ("mim", _mim("base", 9, 0.1)),
    "beitv2_large_patch16_224": lambda: ("mim", _mim("large", 21, 1e-5)),
    "beit_base_patch16_224_8k_vocab": lambda: ("mim", _mim("base", 9, 0.1, aggregation=False)),
    # --- the paper's fine-tuning backbones (per-layer relative bias, mean pooling)
    "beitv2_base_patch16_224_ft": lambda: ("vit", _vit("base", init_values=0.1, use_rel_pos_bias=True,
                                                       use_shared_rel_pos_bias=False, use_mean_pooling=True,
                                                       num_classes=1000, drop_path_rate=0.1)),
    # --- small architectures for 28-64 px images on CPU (patch 4)
    "vqkd_tiny": lambda: ("vqkd", VQKDConfig(
        encoder=vqkd_encoder_config(**_small_vit(28, 128, 4, 4)), decoder_depth=1,
        quantizer=QuantizerConfig(num_codes=1024, code_dim=32), teacher_dim=128)),
    "vqkd_small": lambda: ("vqkd", VQKDConfig(
        encoder=vqkd_encoder_config(**_small_vit(32, 256, 6, 8)), decoder_depth=2,
        quantizer=QuantizerConfig(num_codes=2048, code_dim=32), teacher_dim=256)),
    "beitv2_tiny": lambda: ("mim", MIMConfig(
        backbone=ViTConfig(**_small_vit(28, 128, 6, 4, init_values=0.1)), vocab_size=1024,
        early_layers=4, head_layers=2)),
    "beitv2_small": lambda: ("mim", MIMConfig(
        backbone=ViTConfig(**_small_vit(32, 256, 12, 8, init_values=0.1, drop_path_rate=0.1)), vocab_size=2048,
        early_layers=9, head_layers=2)),
    "beitv2_small64": lambda: ("mim", MIMConfig(
        backbone=ViTConfig(**_small_vit(64, 256, 12, 8, init_values=0.1, drop_path_rate=0.1)), vocab_size=8192,
        early_layers=9, head_layers=2)),
    "vit_tiny": lambda: ("vit", ViTConfig(**_small_vit(28, 128, 6, 4, init_values=0.1, use_mean_pooling=True))),
    # --- BEiT v1's dVAE tokenizers (models/dvae.py)
    **{name: (lambda f=f: ("dvae", f())) for name, f in DVAE_ARCHITECTURES.items()},
}


def list_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(name: str) -> tuple[str, Any]:
    """(kind, a fresh config) for an architecture name; kind is a `beitv2.models.registry` kind."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(list_architectures())}")
    return ARCHITECTURES[name]()


def build_model(name: str, **overrides: Any) -> nn.Module:
    """The named architecture's model; ``overrides`` replace config fields, nested sections as mappings
    (``build_model("beitv2_tiny", vocab_size=512, backbone={"depth": 4})``); unknown names raise `ConfigError`."""
    kind, cfg = get_architecture(name)
    if overrides:

        cfg = from_dict(type(cfg), overrides, base=cfg)
        validate_config(cfg)
    return build(kind, cfg)


def count_learnable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
