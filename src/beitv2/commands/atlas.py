"""`beitv2 atlas`: the codebook atlas of any tokenizer on any data set (the quickstart's figure).

For the most used codes, a mosaic of image patches the tokenizer assigns to each, with their context, titled with
the code's share of all patches and, for labelled data, the most common class among those patches' images ("same
code, same meaning", BEiT v2 Fig. 3). Writes the PNG and ``<png>.json`` (codes, counts, class purity).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import check, opt
from ..data import FASHION_MNIST_CLASSES, DataConfig
from ..interop.tokenizer_ref import TokenizerRef, image_batches, load_tokenizer
from ..report.atlas import codebook_atlas
from ._training import configure_parser, resolve_config

HELP = "draw the codebook atlas (patches per code) of a tokenizer on a data set"
DESCRIPTION = __doc__


@dataclass
class AtlasSection:
    out: str = opt("codebook_atlas.png", "output PNG (statistics go to <out>.json)")
    split: Literal["train", "val"] = opt("val", "which split of the data source")
    max_images: int = opt(5000, "images tokenized for the atlas (the first ones of the split)")
    top_k: int = opt(16, "codes shown (the most used)")
    per_code: int = opt(16, "patches shown per code (drawn at random among its patches)")
    margin: int = opt(-1, "pixels of context around each patch (-1 = one patch)")
    seed: int = opt(0, "seed of the patch draw")
    batch_size: int = opt(256, "images per forward pass")
    progress: bool = opt(True, "progress bar")

    def validate(self, prefix: str = "atlas.") -> None:
        check(self.out.endswith(".png"), prefix + "out", f"must end in .png, got {self.out!r}")
        for name in ("max_images", "top_k", "per_code", "batch_size"):
            check(getattr(self, name) >= 1, prefix + name, "must be >= 1")


@dataclass
class AtlasConfig:
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef, metadata={"help": "tokenizer"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "images"})
    atlas: AtlasSection = field(default_factory=AtlasSection, metadata={"help": "figure"})

    def validate(self, prefix: str = "") -> None:
        check(bool(self.tokenizer.checkpoint), "tokenizer.checkpoint", "required (a vqkd or dvae tokenizer)")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, AtlasConfig)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(AtlasConfig, args)
    a = cfg.atlas
    cpu = torch.device("cpu")
    tokenizer, _ = load_tokenizer(cfg.tokenizer, cpu, cfg.data)
    images, labels, n = [], [], 0
    for x, y, _ in image_batches(cfg.data, a.split, tokenizer, a.batch_size, a.progress, "atlas", cpu):
        images.append(x)
        labels.append(y)
        n += len(x)
        if n >= a.max_images:
            break
    check(bool(images), "data.path", "no readable images")
    x, y = torch.cat(images)[: a.max_images], torch.cat(labels)[: a.max_images]
    classes = []
    if cfg.data.kind == "fmnist":
        classes = list(FASHION_MNIST_CLASSES)
    labelled = bool((y >= 0).all()) and (cfg.data.kind == "fmnist" or int(y.max()) > 0)
    info = codebook_atlas(tokenizer, x, a.out, top_k=a.top_k, per_code=a.per_code, labels=y if labelled else None,
                          class_names=classes, margin=None if a.margin < 0 else a.margin, seed=a.seed)
    Path(a.out + ".json").write_text(json.dumps(info, indent=2))
    print(f"wrote {a.out}: {len(info['codes'])} codes shown, {info['codes_used']} used on {len(x)} images")
    return 0
