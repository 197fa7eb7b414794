"""The frozen tokenizer a command names (``--tokenizer.*`` of pretrain, tokenize and atlas) and what the commands
that read images through it share: the tokenizer loaded for inference (`load_tokenizer`) and images at its input
size (`image_batches`).

A beitv2 file is read by `beitv2.checkpoint.read_model_file`; OpenAI DALL-E's ``encoder.pkl`` by `.dalle`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import load_model, read_model_file
from ..config import ConfigError, check, opt, reading
from ..data import DataConfig, EvalTransform, build_dataset, collate_skip_bad, for_loader, prepare_batch
from ..models.registry import KINDS
from .dalle import dalle_config, is_dalle_file, load_dalle, read_dalle

log = logging.getLogger("beitv2.tokenizer")


@dataclass
class TokenizerRef:
    """A frozen tokenizer named by a file (``--tokenizer.*`` of pretrain, tokenize, atlas): a beitv2 file of a kind
    that makes tokens (`ModelKind.tokens`: vqkd, dvae) or OpenAI DALL-E's ``encoder.pkl``."""

    checkpoint: str = opt("", "tokenizer weights made by this project (a .safetensors file, a checkpoint directory "
                              "or a run directory: its latest checkpoint), or OpenAI DALL-E's encoder.pkl (BEiT v1; "
                              "read without running pickled code)")
    dalle_img_size: int = opt(112, "DALL-E encoder.pkl only: tokenizer view size (BEiT v1: 112 = 14 x 8)")

    def _is_dalle(self) -> bool:
        return is_dalle_file(self.checkpoint)

    def load(self) -> tuple[Any, str]:
        """(tokenizer in eval mode, kind)."""
        if self._is_dalle():
            return load_dalle(self.checkpoint, img_size=self.dalle_img_size), "dvae (DALL-E)"
        model, kind, _ = load_model(self.checkpoint)
        return model, kind

    def describe(self) -> tuple[str, tuple[int, int], int, tuple[int, int], int]:
        """(kind, grid, vocab, image size, channels) read from the file's metadata, without building the model."""
        if self._is_dalle():
            return self._describe_dalle()
        with reading("tokenizer.checkpoint"):
            f = read_model_file(self.checkpoint, weights=False)
        tokenizers = [k for k, s in KINDS.items() if s.tokens is not None]
        check(f.spec.tokens is not None, "tokenizer.checkpoint",
              f"{self.checkpoint} holds a {f.kind} model, not a tokenizer ({' or '.join(tokenizers)})")
        return (f.kind, *f.spec.tokens(f.config))

    def _describe_dalle(self) -> tuple[str, tuple[int, int], int, tuple[int, int], int]:
        check(self.dalle_img_size > 0, "tokenizer.dalle_img_size", "must be > 0")
        try:
            part, enc = read_dalle(self.checkpoint)
            check(part == "encoder", "tokenizer.checkpoint", f"{self.checkpoint} is DALL-E's decoder; pass "
                                                             "encoder.pkl")
            c = dalle_config(enc, img_size=self.dalle_img_size)
            c.validate("tokenizer.dalle_img_size: ")
        except (ValueError, pickle.UnpicklingError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"tokenizer.checkpoint: {e}") from e
        return ("dvae", *KINDS["dvae"].tokens(c))


def load_tokenizer(ref: TokenizerRef, device: torch.device, data: DataConfig | None = None) -> tuple[Any, str]:
    """(tokenizer in eval mode on ``device``, kind); a file of another kind exits 2 naming the option. ``data`` is
    set to read images with the tokenizer's input channels (a grayscale tokenizer gets
    'L' images), as the evaluation commands do for their backbones."""
    in_chans = ref.describe()[4]  # checks the kind, naming tokenizer.checkpoint
    if data is not None and data.channels != in_chans:
        log.info("data.channels %d -> %d to match the tokenizer's input channels", data.channels, in_chans)
        data.channels = in_chans
    with reading("tokenizer.checkpoint"):
        tok, kind = ref.load()
    return tok.to(device).eval().requires_grad_(False), kind


def image_batches(data: DataConfig, split: str, tokenizer: Any, batch_size: int, progress: bool, desc: str,
                  device: torch.device):
    """Yield (images [B, C, H, W] in [0, 1] at the tokenizer's size, on ``device``, labels [B], ids) over a data
    source; the loader ships uint8 images, converted on the device."""
    size = tuple(int(s) for s in tokenizer.img_size) if not isinstance(tokenizer.img_size, int) else \
        (tokenizer.img_size,) * 2
    tf = EvalTransform(size, min(size), "bicubic", normalize="none", channels=data.channels)
    ds = build_dataset(data, split, tf)  # type: ignore[arg-type]
    check(ds is not None, "data.val_path", f"the {data.kind} source has no validation split")
    files = getattr(ds.base, "files", None)
    source = getattr(ds.base, "source_indices", None)  # Fashion-MNIST: ids are indices in the IDX file, not the subset
    spec = ds.batch_spec
    loader = DataLoader(for_loader(ds), batch_size=batch_size, shuffle=False, num_workers=data.num_workers,
                        collate_fn=collate_skip_bad)
    total = len(ds) if hasattr(ds.base, "__len__") else None
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    for batch in loader:
        bar.update(len(batch.get("index", [])) + batch["num_skipped"])
        if "image" not in batch:
            continue
        idx = batch["index"].tolist()
        ids = [files[i] for i in idx] if files is not None else \
            [int(source[i]) for i in idx] if source is not None else idx
        yield prepare_batch({"image": batch["image"].to(device)}, spec)["image"], batch["label"], ids
    bar.close()
