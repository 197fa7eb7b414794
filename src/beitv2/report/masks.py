"""Examples of masks drawn by a mask generator (blockwise or random), optionally laid over images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..masking import count_blocks
from ..utils.figures import figure, save_figure


def mask_examples(generator, out_png: str | Path, n: int = 8, images: torch.Tensor | None = None, seed: int = 0,
                  title: str = "") -> dict:
    """``n`` masks from ``generator`` (seeded), each titled with its masked-patch and block counts; masked patches
    are dark over ``images`` ([n, C, H, W] in [0, 1]) when given, else drawn as a grid. Returns summary numbers."""
    rng = np.random.default_rng(seed)
    masks = [np.asarray(generator(rng), dtype=bool) for _ in range(n)]
    gh, gw = masks[0].shape
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = figure(rows, cols, figsize=(1.7 * cols, 1.95 * rows), squeeze=False)
    blocks = []
    for i, (ax, m) in enumerate(zip(axes.flat, masks)):
        blocks.append(count_blocks(m))
        if images is not None and i < len(images):
            img = images[i].float().clamp(0, 1)
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
            a = img.permute(1, 2, 0).numpy().copy()
            H, W = a.shape[:2]
            up = np.kron(m, np.ones((H // gh, W // gw), dtype=bool))
            a[up] = a[up] * 0.25 + np.array([0.1, 0.3, 0.9]) * 0.75
            ax.imshow(a)
        else:
            ax.imshow(~m, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks(np.arange(-0.5, gw, 1) if images is None else [])
        ax.set_yticks(np.arange(-0.5, gh, 1) if images is None else [])
        ax.tick_params(length=0, labelbottom=False, labelleft=False)
        if images is None:
            ax.grid(color="0.6", linewidth=0.5)
        ax.set_title(f"{int(m.sum())} masked, {blocks[-1]} blk", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or repr(generator), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    return {"n": n, "grid": [gh, gw], "masked_per_image": [int(m.sum()) for m in masks], "blocks": blocks}
