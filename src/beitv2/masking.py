"""Mask generators for masked image modeling.

`BlockwiseMaskGenerator` follows BEiT v2's `masking_generator.py`: rectangles of area uniform in
[min_num_patches, remaining] with a log-uniform aspect ratio, at most 10 placement attempts per block, then a top-up
with random single patches so that exactly ``num_masking_patches`` are masked (v2 behaviour; v1 stopped short). The
exact count keeps ``x[bool_masked_pos]`` rectangular across a batch.

Randomness comes from a `numpy.random.Generator` passed per call (data sets derive one from (seed, epoch, index), which
makes masks reproducible and independent of the worker that draws them) or, failing that, one owned by the generator
and re-seeded in each new process so forked data-loader workers never share a stream.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .config import check


class _MaskGeneratorBase:
    def __init__(self, grid: int | tuple[int, int], num_masking_patches: int, seed: int | None = None):
        h, w = (grid, grid) if isinstance(grid, int) else grid
        check(h > 0 and w > 0, "mask.grid", f"must be positive, got {(h, w)}")
        check(0 <= num_masking_patches <= h * w, "mask.num_masking_patches",
              f"must be in [0, {h * w}] for a {h}x{w} grid, got {num_masking_patches}")
        self.height, self.width = h, w
        self.num_patches = h * w
        self.num_masking_patches = int(num_masking_patches)
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._pid = -1

    def _own_rng(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            entropy = [self.seed] if self.seed is not None else []
            # A new process (a forked worker) must not replay its parent's stream.
            entropy = entropy + ([os.getpid()] if self._pid != -1 or self.seed is None else [])
            self._rng = np.random.default_rng(entropy or None)
            self._pid = os.getpid()
        return self._rng

    @property
    def exact_count(self) -> bool:
        """Whether every mask holds exactly ``num_masking_patches`` patches (so a batch of masked positions stacks)."""
        return True

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.generate(rng if rng is not None else self._own_rng())

    def batch(self, n: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """``n`` masks as the models take them: a BoolTensor [n, H*W] (row-major patch order)."""
        return torch.from_numpy(np.stack([self(rng).reshape(-1) for _ in range(n)])).bool()

    def generate(self, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class RandomMaskGenerator(_MaskGeneratorBase):
    """Uniformly random patches (the ablation the BEiT papers compare blockwise masking with)."""

    def __repr__(self) -> str:
        return f"RandomMaskGenerator({self.height}x{self.width}, n={self.num_masking_patches})"

    def generate(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, self.num_masking_patches, replace=False)] = True
        return mask.reshape(self.height, self.width)


class BlockwiseMaskGenerator(_MaskGeneratorBase):
    """BEiT blockwise masking with the v2 exact-count top-up (``top_up=False``: BEiT v1's generator, which stops at
    whatever count the blocks reached, so a mask may hold fewer than ``num_masking_patches`` patches)."""

    def __init__(self, grid: int | tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                 seed: int | None = None, top_up: bool = True):
        super().__init__(grid, num_masking_patches, seed)
        self.top_up = top_up
        check(min_num_patches >= 1, "mask.min_num_patches", f"must be >= 1, got {min_num_patches}")
        check(min_aspect > 0, "mask.min_aspect", f"must be > 0, got {min_aspect}")
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"BlockwiseMaskGenerator({self.height}x{self.width}, n={self.num_masking_patches}, "
                f"min_block={self.min_num_patches}, log_aspect={self.log_aspect_ratio})")

    def _place_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; return how many new patches the first accepted one masked (0 if none)."""
        for _ in range(10):
            # python's random.uniform semantics (as the official code): valid even when max_new < min_num_patches
            target_area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            lo, hi = self.log_aspect_ratio
            aspect = math.exp(lo + (hi - lo) * rng.random())
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_new:
                    window[...] = True
                    return new
        return 0

    @property
    def exact_count(self) -> bool:
        return self.top_up

    def generate(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = blocks = 0
        while count < self.num_masking_patches:
            max_new = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, max_new, rng)
            if delta == 0:
                break
            count += delta
            blocks += 1
        self.last_num_blocks = blocks  # rectangles placed in the latest draw (statistics and tests)
        if self.top_up and count < self.num_masking_patches:  # random single patches up to the exact count
            free = np.flatnonzero(~mask.ravel())
            pick = rng.choice(free, self.num_masking_patches - count, replace=False)
            mask.ravel()[pick] = True
        return mask


def build_mask_generator(kind: str, grid: int | tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                         max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                         seed: int | None = None, top_up: bool = True) -> _MaskGeneratorBase:
    """``kind`` is 'block' (BEiT blockwise; ``top_up=False`` for BEiT v1's count) or 'random'."""
    if kind == "block":
        return BlockwiseMaskGenerator(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                                      max_aspect, seed, top_up)
    if kind == "random":
        return RandomMaskGenerator(grid, num_masking_patches, seed)
    check(False, "mask.kind", f"must be 'block' or 'random', got {kind!r}")
    raise AssertionError  # unreachable


def count_blocks(mask: np.ndarray) -> int:
    """Number of 4-connected masked components (used to compare with the reference ~4.1 blocks per 14x14 mask)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    n = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                n += 1
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and mask[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            stack.append((x, y))
    return n
