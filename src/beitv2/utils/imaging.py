"""The input contract shared by frozen teachers and the networks trained to be one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma with PIL's fixed-point weights (Image.convert('L')); they sum to exactly 1, so a gray pixel
# (R = G = B) keeps its value. The one RGB -> gray rule: 1-channel exports and grayscale teachers both use it.
LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)


def fit_input(images01: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> resized to ``size`` (bicubic, antialiased, clamped back to [0, 1]), normalised by
    ``mean`` / ``std`` ([1, C, 1, 1]). One function, so a teacher trained here sees in training exactly what it sees
    when VQ-KD distils it."""
    x = images01.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return (x - mean) / std
