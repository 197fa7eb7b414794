"""Per-iteration cosine schedules with linear warmup, as in the official `utils.cosine_scheduler`.

The official formula is kept exactly (warmup = ``linspace(0, base, warmup_iters)``, then
``final + (base - final) * (1 + cos(pi * i / n)) / 2`` over the remaining ``n`` iterations), with its bug fixed:
``warmup_steps > 0`` together with ``warmup_epochs == 0`` no longer fails. timm's schedulers use a
different warmup formula and cannot schedule weight decay per group, hence this small function.
"""

from __future__ import annotations

import math

import numpy as np


def warmup_iterations(total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, warmup_steps: int = 0) -> int:
    """Warmup length in steps: ``warmup_steps`` if positive, else ``warmup_epochs * steps_per_epoch``."""
    n = warmup_steps if warmup_steps > 0 else round(warmup_epochs * steps_per_epoch)
    return max(0, min(n, total_steps))


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """Values for steps ``0 .. total_steps - 1``: linear warmup from ``start_warmup`` then cosine to ``final``."""
    warm = max(0, min(warmup_steps, total_steps))
    head = np.linspace(start_warmup, base, warm) if warm > 0 else np.zeros(0)
    n = total_steps - warm
    i = np.arange(n)
    tail = final + 0.5 * (base - final) * (1 + np.cos(math.pi * i / max(n, 1)))
    out = np.concatenate([head, tail]).astype(np.float64)
    assert len(out) == total_steps
    return out


def poly_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, power: float = 1.0,
                  warmup_ratio: float = 0.0) -> np.ndarray:
    """mmcv's ``PolyLrUpdaterHook`` with linear warmup (the official segmentation schedule): step ``i`` gets
    ``(base - final) * (1 - i / total) ** power + final``, multiplied during the first ``warmup_steps`` steps by
    ``1 - (1 - i / warmup_steps) * (1 - warmup_ratio)``, so step 0 already trains at ``warmup_ratio`` of the lr."""
    i = np.arange(total_steps, dtype=np.float64)
    out = (base - final) * (1.0 - i / max(total_steps, 1)) ** power + final
    warm = max(0, min(warmup_steps, total_steps))
    if warm > 0:
        out[:warm] *= 1.0 - (1.0 - i[:warm] / warm) * (1.0 - warmup_ratio)
    return out


def lr_schedule(kind: str, base: float, final: float, total_steps: int, warmup_steps: int, power: float = 1.0,
                warmup_ratio: float = 0.0) -> np.ndarray:
    """The per-step lr values of ``OptimConfig.schedule``."""
    if kind == "poly":
        return poly_schedule(base, final, total_steps, warmup_steps, power, warmup_ratio)
    return cosine_schedule(base, final, total_steps, warmup_steps)
