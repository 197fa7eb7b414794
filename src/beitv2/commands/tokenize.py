"""`beitv2 tokenize`: turn images into the tokenizer's codes (the MIM targets), with usage statistics.

Images come from any data source of the training commands (``--data.kind folder|fmnist|wds``), resized (short side)
and centre-cropped to the tokenizer's input size, in [0, 1]. The output (``--out.path``, ``.safetensors`` or
``.npz``) holds ``codes`` (int32 [N, h, w], the code grid of each image, row-major), ``labels`` (int64 [N], -1 when
unlabelled), ``counts`` (int64 [vocab], how often each code occurs) and the image ids (a folder's relative paths, a
Fashion-MNIST image's index in its IDX file, also under ``--data.subset``, a shard sample's id), in safetensors
metadata (JSON) or as the npz array ``ids``. A JSON file beside it (``<path>.json``) gives the usage statistics: codes
used, dead codes, perplexity, the most used codes. Images are read with the tokenizer's input channels
(``data.channels`` follows the tokenizer). Unreadable images are skipped and reported by path.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import atomic_write
from ..config import check, check_output_dir, opt
from ..data import DataConfig
from ..engine.precision import bf16_autocast
from ..interop.tokenizer_ref import TokenizerRef, image_batches, load_tokenizer
from ._training import configure_parser, resolve_config

HELP = "turn images into tokenizer codes (code grids + image ids + usage statistics)"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.tokenize")


@dataclass
class TokenizeOutput:
    path: str = opt("codes.safetensors", "output file: .safetensors or .npz (usage statistics go to <path>.json)")
    split: Literal["train", "val"] = opt("train", "which split of the data source to tokenize")
    batch_size: int = opt(256, "images per forward pass")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: Literal["bf16", "fp32"] = opt("fp32", "autocast dtype of the tokenizer (fp32: exact nearest codes)")
    progress: bool = opt(True, "progress bar")
    top: int = opt(20, "most used codes listed in the statistics")

    def validate(self, prefix: str = "out.") -> None:
        check(Path(self.path).suffix in (".safetensors", ".npz"), prefix + "path",
              f"must end in .safetensors or .npz, got {self.path!r}")
        check(self.batch_size >= 1, prefix + "batch_size", "must be >= 1")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), prefix + "device",
              f"auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class TokenizeConfig:
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef, metadata={"help": "tokenizer"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "images"})
    out: TokenizeOutput = field(default_factory=TokenizeOutput, metadata={"help": "output"})

    def validate(self, prefix: str = "") -> None:
        check(bool(self.tokenizer.checkpoint), "tokenizer.checkpoint", "required (a vqkd or dvae tokenizer)")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, TokenizeConfig)


def usage_stats(counts: torch.Tensor, top: int) -> dict[str, Any]:
    total = int(counts.sum())
    p = counts.double() / max(total, 1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    order = torch.argsort(counts, descending=True)[:top]
    return {"num_patches": total, "vocab_size": int(counts.numel()), "codes_used": int((counts > 0).sum()),
            "dead_codes": int((counts == 0).sum()), "usage": float((counts > 0).float().mean()),
            "perplexity": math.exp(entropy),
            "top_codes": [{"code": int(c), "count": int(counts[c]), "share": float(p[c])} for c in order]}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    cfg = resolve_config(TokenizeConfig, args)
    o = cfg.out
    check_output_dir(Path(o.path).expanduser().parent, "out.path")  # before the images are read and tokenized
    device = torch.device(o.device if o.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer, kind = load_tokenizer(cfg.tokenizer, device, cfg.data)
    grid = tuple(int(g) for g in tokenizer.grid_size)
    all_codes, all_labels, all_ids = [], [], []
    with torch.no_grad():
        for images, labels, ids in image_batches(cfg.data, o.split, tokenizer, o.batch_size, o.progress,
                                                 "tokenize", device):
            with bf16_autocast(device, o.precision == "bf16"):
                codes = tokenizer.tokenize(images)
            all_codes.append(codes.cpu().to(torch.int32).reshape(-1, *grid))
            all_labels.append(labels.to(torch.int64))
            all_ids.extend(ids)
    check(bool(all_codes), "data.path", "no readable images")
    codes = torch.cat(all_codes)
    labels = torch.cat(all_labels)
    counts = torch.bincount(codes.reshape(-1).long(), minlength=int(tokenizer.vocab_size))
    stats = usage_stats(counts, o.top)
    stats.update(num_images=int(len(codes)), grid=list(grid), tokenizer=cfg.tokenizer.checkpoint, kind=kind,
                 split=o.split, data=cfg.data.kind)
    out = Path(o.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez_compressed(out, codes=codes.numpy(), labels=labels.numpy(), counts=counts.numpy(),
                            ids=np.array([str(i) for i in all_ids]))
    else:
        from safetensors.torch import save_file

        meta = {"format": "beitv2-codes", "ids": json.dumps(all_ids), "grid": json.dumps(list(grid)),
                "tokenizer": cfg.tokenizer.checkpoint, "kind": kind}
        atomic_write(out, lambda tmp: save_file({"codes": codes, "labels": labels, "counts": counts}, tmp,
                                                metadata=meta))
    Path(str(out) + ".json").write_text(json.dumps(stats, indent=2))
    print(f"wrote {out}: {len(codes)} images x {grid[0]}x{grid[1]} codes; {stats['codes_used']} of "
          f"{stats['vocab_size']} codes used, perplexity {stats['perplexity']:.1f}")
    if kind == "vqkd" and stats["usage"] < 0.5:
        log.warning("less than half of the codebook is in use on these images; retraining the tokenizer with "
                    "--tokenizer.vqkd.quantizer.use_whole_codebook true may help (docs/models.md, 'When codes go "
                    "unused')")
    return 0
