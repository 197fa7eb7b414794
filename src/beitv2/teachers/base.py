"""The `Teacher` base class: the tokenizer's [0, 1] view in, features on the tokenizer's patch grid out (resize to
the teacher's input, its normalisation, its encoder, resampling of its feature map to the tokenizer's grid)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.precision import bf16_autocast
from ..utils.imaging import LUMA, fit_input
from ..utils.sizes import to_2tuple

logger = logging.getLogger("beitv2.teachers")

Stats = tuple[Sequence[float], Sequence[float]]



def infer_grid(num_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of ``num_tokens`` tokens from an ``input_hw`` image (same aspect ratio)."""
    H, W = input_hw
    p = math.sqrt(H * W / num_tokens)
    h, w = max(1, round(H / p)), max(1, round(W / p))
    if h * w != num_tokens:
        raise ValueError(f"cannot lay out {num_tokens} tokens on a grid for a {H}x{W} input")
    return h, w


class Teacher(nn.Module):
    """``forward(images01 [B, C, H, W] in [0, 1]) -> features [B, h*w, feature_dim]`` on ``grid_size``.

    Subclasses implement `encode` (normalised input at ``input_size`` -> patch tokens [B, n, D] in row-major order).
    """

    def __init__(self, grid_size: int | Sequence[int], input_size: int | Sequence[int], mean: Sequence[float],
                 std: Sequence[float], feature_dim: int, bf16: bool = True, resample_mode: str = "bicubic"):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.input_size = to_2tuple(input_size)
        self.feature_dim = int(feature_dim)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.bf16 = bf16
        self.resample_mode = resample_mode
        self.feature_norm = "none"  # or "layernorm": see TeacherConfig.feature_norm

    def freeze(self) -> Teacher:
        """fp32 weights (as the official ``model.float()``; hub checkpoints may load in fp16), no grads, eval."""
        self.float().requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode (no dropout, fixed norm statistics), whatever its parent asks."""
        return super().train(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """Resize to the teacher's resolution (bicubic, antialiased, clamped to [0, 1]) and normalise."""
        x = images01
        channels = self._mean.shape[1]
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)  # a grayscale tokenizer with an RGB teacher
        elif x.shape[1] == 3 and channels == 1:  # an RGB tokenizer with a grayscale teacher: PIL's 'L' weights
            x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] != channels:
            raise ValueError(f"teacher expects {channels}-channel input, got {x.shape[1]}")
        return fit_input(x, self.input_size, self._mean, self._std)

    def resample(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n, D] on the teacher's grid -> [B, h*w, D] on ``grid_size`` (interpolating the [B, D, h, w] map)."""
        own = infer_grid(tokens.shape[1], self.input_size)
        if own == self.grid_size:
            return tokens
        B, _, D = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(B, D, *own)
        smooth = self.resample_mode in ("bilinear", "bicubic")
        shrink = self.grid_size[0] < own[0] or self.grid_size[1] < own[1]  # antialias only when reducing
        fmap = F.interpolate(fmap, size=self.grid_size, mode=self.resample_mode,
                             align_corners=False if smooth else None, antialias=smooth and shrink)
        return fmap.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images01)
        with bf16_autocast(x.device, self.bf16):
            tokens = self.encode(x)
        out = self.resample(tokens.float())
        if self.feature_norm == "layernorm":
            out = F.layer_norm(out, (out.shape[-1],))
        return out.contiguous()

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, grid_size={self.grid_size}, feature_dim={self.feature_dim}, "
                f"mean={self.mean}, std={self.std}, bf16={self.bf16}, feature_norm={self.feature_norm}")


def _stats(mean: Sequence[float] | None, std: Sequence[float] | None, default: Stats) -> Stats:
    return (tuple(mean) if mean else tuple(default[0]), tuple(std) if std else tuple(default[1]))
