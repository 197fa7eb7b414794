"""Tiny real models shared by the tests, each builder written once.

The common size: 16 px images in 4 px patches (a 4 x 4 grid), 32 wide, 2 heads, 2 blocks. A builder takes keywords for
what a test changes: ``vit`` (or ``encoder``) overrides the backbone's fields, the other keywords the model's own
config. A builder draws its weights from torch's global RNG and reseeds it only when given ``seed``, so a test that
builds several models in a row keeps one stream of draws (and the weights it compared before).
"""

from __future__ import annotations

import torch

from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.models.quantizer import QuantizerConfig
from beitv2.models.segmenter import Segmenter, SegmenterConfig
from beitv2.models.vqkd import VQKD, VQKDConfig, vqkd_encoder_config

TINY_VIT = {"img_size": (16,), "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
# a segmentation backbone: 32 px in 8 px patches, four blocks (one per pyramid level), per-block relative tables
TINY_SEG_VIT = {"img_size": (32,), "patch_size": 8, "embed_dim": 16, "depth": 4, "num_heads": 2,
                "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False, "use_mean_pooling": True}


def _seeded(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def tiny_vit(**kw) -> ViTConfig:
    """The ViT config of the common size (layer scale, shared relative bias: the library's defaults)."""
    return ViTConfig(**{**TINY_VIT, **kw})


def tiny_backbone(*, seed: int | None = None, **kw) -> BEiTViT:
    """A ViT of the common size; keywords override ``tiny_vit``'s fields."""
    _seeded(seed)
    return BEiTViT(tiny_vit(**kw))


def tiny_mim(*, seed: int | None = None, vit: dict | None = None, **kw) -> BEiTv2ForMIM:
    """BEiT v2 MIM of the common size: 16 codes, the aggregation head reading block 1 through one block."""
    _seeded(seed)
    cfg = {"vocab_size": 16, "early_layers": 1, "head_layers": 1, **kw}
    return BEiTv2ForMIM(MIMConfig(backbone=tiny_vit(**(vit or {})), **cfg))


def tiny_vqkd(*, seed: int | None = None, encoder: dict | None = None, num_codes: int = 16, code_dim: int = 4,
              kmeans_init: bool = True, **kw) -> VQKD:
    """A VQ-KD tokenizer with a one-block encoder and decoder of the common size and an 8-dim teacher."""
    _seeded(seed)
    enc = vqkd_encoder_config(**{**TINY_VIT, "depth": 1, **(encoder or {})})
    quantizer = QuantizerConfig(num_codes=num_codes, code_dim=code_dim, kmeans_init=kmeans_init)
    return VQKD(VQKDConfig(**{"encoder": enc, "decoder_depth": 1, "quantizer": quantizer, "teacher_dim": 8, **kw}))


def tiny_seg_vit(**kw) -> ViTConfig:
    """The segmentation backbone (``TINY_SEG_VIT``); keywords override its fields."""
    return ViTConfig(**{**TINY_SEG_VIT, **kw})


def tiny_segmenter(*, seed: int | None = None, vit: dict | None = None, **kw) -> Segmenter:
    """A UperNet segmenter of 5 classes on ``tiny_seg_vit`` with an 8-channel auxiliary head."""
    _seeded(seed)
    cfg = {"num_classes": 5, "auxiliary_channels": 8, **kw}
    return Segmenter(SegmenterConfig(backbone=tiny_seg_vit(**(vit or {})), **cfg))
