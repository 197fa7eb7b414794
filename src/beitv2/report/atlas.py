"""Codebook atlas: for the most used codes, the image patches the tokenizer assigns to each (BEiT v2 Fig. 3,
"same code, same meaning"). Each patch is shown with a margin of neighbouring pixels, its own area framed in red,
so that 4-pixel patches of small images stay readable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.precision import bf16_autocast
from ..utils.figures import figure, save_figure


@torch.no_grad()
def tokenize_all(tokenizer, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Codes [B, N] of ``images`` ([B, C, H, W] in [0, 1] at the tokenizer's size), in batches (bf16 where native)."""
    out = []
    dev = next(tokenizer.parameters()).device
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(dev)
        with bf16_autocast(dev):
            out.append(tokenizer.tokenize(x).cpu())
    return torch.cat(out)


def _crops(images: torch.Tensor, grid: tuple[int, int], p: int, margin: int, scale: int,
           picks: list[tuple[int, int]], pad_value: float = 0.0) -> list[np.ndarray]:
    """RGB uint8 crops [s*(p+2m), s*(p+2m), 3] around patches (image, patch index), patch area framed in red."""
    x = images.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    padded = F.pad(x, (margin, margin, margin, margin), value=pad_value)
    out = []
    for img_i, patch in picks:
        r, c = divmod(int(patch), grid[1])
        y0, x0 = r * p, c * p  # in padded coordinates the margin offsets cancel
        crop = padded[img_i, :, y0:y0 + p + 2 * margin, x0:x0 + p + 2 * margin]
        crop = crop.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        a = (crop.permute(1, 2, 0).numpy() * 255).astype(np.uint8).copy()
        lo, hi = margin * scale, (margin + p) * scale - 1
        red = np.array([220, 30, 30], dtype=np.uint8)
        a[lo:hi + 1, [lo, hi]] = red
        a[[lo, hi], lo:hi + 1] = red
        out.append(a)
    return out


def _mosaic(tiles: list[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    h, w, _ = tiles[0].shape
    rows = math.ceil(len(tiles) / cols)
    m = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        m[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t
    return m


def codebook_atlas(tokenizer, images: torch.Tensor, out_png: str | Path, top_k: int = 16, per_code: int = 16,
                   labels: torch.Tensor | None = None, class_names: Sequence[str] = (), margin: int | None = None,
                   pad_value: float = 0.0, seed: int = 0, codes: torch.Tensor | None = None) -> dict:
    """Grid of the ``top_k`` most used codes, each a mosaic of ``per_code`` patches assigned to it (drawn at random
    among all its patches), titled with the code id, its share of all patches and, with ``labels``, the most common
    class of the images those patches come from. Each patch is shown with ``margin`` pixels of context (default:
    one patch) padded with ``pad_value`` at the image border.

    Returns {"codes": [...], "counts": [...], "codes_used", "num_patches", "class_purity" (mean share of the top
    class per shown code, with labels)}. ``codes`` may pass precomputed tokens [B, N].
    """
    grid = tuple(int(g) for g in tokenizer.grid_size)
    H = int(images.shape[-2])
    p = H // grid[0]
    margin = p if margin is None else margin
    codes = tokenize_all(tokenizer, images) if codes is None else codes
    flat = codes.reshape(-1)
    counts = torch.bincount(flat, minlength=int(tokenizer.vocab_size))
    top = torch.argsort(counts, descending=True)[:top_k]
    top = top[counts[top] > 0]
    gen = torch.Generator().manual_seed(seed)
    n_patches = codes.shape[1]
    scale = max(1, 48 // (p + 2 * margin))
    info = {"codes": [], "counts": [], "top_class": [], "top_class_share": [],
            "codes_used": int((counts > 0).sum()), "num_patches": int(flat.numel())}
    cols = math.ceil(math.sqrt(len(top)))
    rows = math.ceil(len(top) / cols)
    fig, axes = figure(rows, cols, figsize=(2.3 * cols, 2.55 * rows), squeeze=False)
    for ax, code in zip(axes.flat, top.tolist()):
        where = (flat == code).nonzero().squeeze(1)
        pick = where[torch.randperm(len(where), generator=gen)[:per_code]]
        picks = [(int(i) // n_patches, int(i) % n_patches) for i in pick]
        tiles = _crops(images, grid, p, margin, scale, picks, pad_value)
        ax.imshow(_mosaic(tiles, math.ceil(math.sqrt(len(tiles)))))
        share = 100.0 * int(counts[code]) / max(flat.numel(), 1)
        title = f"code {code} ({share:.1f}%)"
        info["codes"].append(int(code))
        info["counts"].append(int(counts[code]))
        if labels is not None:
            img_of = where // n_patches
            cls = torch.bincount(labels[img_of].long(), minlength=max(len(class_names), 1))
            best = int(cls.argmax())
            frac = float(cls[best]) / max(int(cls.sum()), 1)
            info["top_class"].append(best)
            info["top_class_share"].append(frac)
            name = class_names[best] if best < len(class_names) else str(best)
            title += f"\n{100 * frac:.0f}% {name}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(top):]:
        ax.axis("off")
    fig.suptitle(f"codebook atlas: the {len(top)} most used of {info['codes_used']} used codes "
                 f"(red frame = the patch, with {margin} px of context)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)
    if info["top_class_share"]:
        info["class_purity"] = float(np.mean(info["top_class_share"]))
    return info
