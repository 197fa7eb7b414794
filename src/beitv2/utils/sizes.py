"""Image and grid sizes: one normaliser for the int / (S,) / (H, W) forms a size may take."""

from __future__ import annotations

from collections.abc import Sequence


def to_2tuple(v: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a size given as an int, a one-element sequence (square) or (H, W)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def size_field(v: int | Sequence[int]) -> tuple[int, ...]:
    """The form configs store (`ViTConfig.img_size`): (S,) when square, else (H, W)."""
    h, w = to_2tuple(v)
    return (h,) if h == w else (h, w)
