"""Attention maps of a ViT: where one query patch looks (the BEiT paper's self-attention figure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.figures import figure, save_figure


def _query_index(query: int | tuple[int, int] | str | None, grid: tuple[int, int]) -> tuple[int, str]:
    """Token index in [0, 1+N) and a label; None = the centre patch, 'cls' = the CLS token, int = row-major patch."""
    if query is None:
        query = (grid[0] // 2, grid[1] // 2)
    if isinstance(query, str):
        if query != "cls":
            raise ValueError(f"query must be a patch index, (row, col), 'cls' or None, got {query!r}")
        return 0, "CLS"
    if isinstance(query, (tuple, list)):
        r, c = int(query[0]), int(query[1])
    else:
        r, c = divmod(int(query), grid[1])
    if not (0 <= r < grid[0] and 0 <= c < grid[1]):
        raise ValueError(f"query patch {(r, c)} outside the {grid[0]}x{grid[1]} grid")
    return 1 + r * grid[1] + c, f"patch ({r}, {c})"


def _display(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] -> [B, H, W, 3] in [0, 1], min-max scaled per image (inputs are usually normalised)."""
    x = images.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_figure(model, images: torch.Tensor, out_png: str | Path, layer: int = -1,
                     query: int | tuple[int, int] | str | None = None, display_images: torch.Tensor | None = None,
                     max_heads: int = 4, title: str = "") -> dict:
    """One row per image: the image with the query patch framed, the attention of that query over the patches
    (mean over heads, overlaid), and the first ``max_heads`` heads on their own.

    ``model``: a `BEiTViT` (or a subclass such as `BEiTv2ForMIM`) with ``attention_maps(x, layer)``; ``images``: its
    normalised input [B, C, H, W]; ``display_images``: what to draw instead (e.g. the [0, 1] originals). Returns
    {"layer", "query", "entropy"(mean over images of the mean-head attention entropy, in nats)}.
    """
    model = model.eval()
    grid = tuple(int(g) for g in model.grid_size)
    H, W = int(images.shape[-2]), int(images.shape[-1])
    ph, pw = H // grid[0], W // grid[1]
    q, qlabel = _query_index(query, grid)
    dev = next(model.parameters()).device
    attn = model.attention_maps(images.to(dev).float(), layer).float().cpu()  # [B, heads, 1+N, 1+N]
    per_head = attn[:, :, q, 1:].reshape(attn.shape[0], attn.shape[1], *grid)  # over patches only
    mean = per_head.mean(dim=1)
    up = lambda m: F.interpolate(m[:, None], size=(H, W), mode="nearest")[:, 0].numpy()  # noqa: E731
    mean_up = up(mean)
    heads = min(max_heads, attn.shape[1])
    heads_up = [up(per_head[:, h]) for h in range(heads)]
    shown = _display(display_images if display_images is not None else images)
    from matplotlib.patches import Rectangle  # matplotlib loads only when a figure is drawn (utils.figures does too)

    B = images.shape[0]
    cols = 2 + heads
    fig, axes = figure(B, cols, figsize=(1.9 * cols, 2.0 * B), squeeze=False)
    depth = getattr(model, "depth", None)
    layer_no = (layer % depth) + 1 if depth else layer
    for i in range(B):
        ax = axes[i, 0]
        ax.imshow(shown[i])
        if q > 0:
            r, c = divmod(q - 1, grid[1])
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red",
                                       linewidth=1.5))
        ax.set_title("image, query" if i == 0 else "", fontsize=8)
        ax = axes[i, 1]
        ax.imshow(shown[i].mean(axis=-1), cmap="gray")
        ax.imshow(mean_up[i], cmap="inferno", alpha=0.65)
        ax.set_title("mean of heads" if i == 0 else "", fontsize=8)
        for h in range(heads):
            axes[i, 2 + h].imshow(heads_up[h][i], cmap="inferno")
            axes[i, 2 + h].set_title(f"head {h}" if i == 0 else "", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"attention of the {qlabel} query over the patches, block {layer_no}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)
    p = mean.flatten(1)
    p = p / p.sum(dim=1, keepdim=True)
    entropy = float((-(p * p.clamp_min(1e-12).log()).sum(dim=1)).mean())
    return {"layer": layer_no, "query": qlabel, "entropy": entropy, "uniform_entropy": float(np.log(p.shape[1]))}
