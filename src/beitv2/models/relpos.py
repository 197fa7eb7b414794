"""Relative position bias tables: the per-forward bias gather (`rel_pos_bias`), and resizing the tables and
absolute position embeddings to another input resolution.

The relative table follows the official BEiT fine-tuning remap (`run_class_finetuning.py`):

1. The last 3 rows (CLS->patch, patch->CLS, CLS->CLS) are split off and re-appended unchanged.
2. The remaining (2Wh-1)(2Ww-1) rows form one src_h x src_w grid per head (row-major, Δh major).
3. Per axis, a ratio q in [1.01, 1.5] is found by bisection (tolerance 1e-6) so that the geometric sum
   1 + q + ... + q^(src//2 - 1) reaches dst//2; the source samples sit at the symmetric cumulative distances
   [..., -(1+q), -1, 0, 1, 1+q, 1+q+q^2, ...] and the targets at the integers -dst//2 ... dst//2.
4. Each head is interpolated with a bicubic spline on that non-uniform grid.

The official code called `scipy.interpolate.interp2d(kind='cubic')`, removed in SciPy 1.14. On a rectangular grid
interp2d fits FITPACK's interpolating bicubic spline (s=0), whose knots give the *not-a-knot* end conditions; a
tensor-product interpolating spline is separable, so we compute exactly that: a 1-D not-a-knot cubic spline along
each axis, written as a dense (dst x src) interpolation matrix per axis, and apply ``M_h @ Z @ M_w^T`` per head in
float64. Targets beyond the outermost source sample (by the bisection tolerance) are clamped to it, matching
interp2d's nearest extrapolation. Axes with fewer than 4 samples use the interpolating polynomial (degree n-1), the
limit of the not-a-knot spline. Unlike the official code, non-square windows are supported (each axis has its own q).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import resample_abs_pos_embed

from ..utils.sizes import to_2tuple

NUM_EXTRA = 3  # CLS->patch, patch->CLS, CLS->CLS


def table_rows(window: int | Sequence[int]) -> int:
    """Rows of the relative position table of a (Wh, Ww) window: (2Wh-1)(2Ww-1) + 3."""
    h, w = to_2tuple(window)
    return (2 * h - 1) * (2 * w - 1) + NUM_EXTRA


def square_window_from_rows(rows: int) -> int:
    """W such that (2W-1)^2 + 3 == rows (official checkpoints are square); raises if there is none."""
    side = round((rows - NUM_EXTRA) ** 0.5)
    if side * side != rows - NUM_EXTRA or side % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not (2W-1)^2 + 3 for any window W")
    return (side + 1) // 2


def geometric_ratio(src: int, dst: int) -> float:
    """Official bisection: q in [1.01, 1.5] with sum_{k < src//2} q^k ~= dst//2 (q stays at 1.01 when shrinking)."""
    n, target = src // 2, dst // 2
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** n) / (1.0 - q)
        if gp > target:
            right = q
        else:
            left = q
    return q


def source_coords(src: int, dst: int) -> torch.Tensor:
    """Symmetric cumulative-distance positions of the ``src`` table samples along one axis (float64)."""
    q = geometric_ratio(src, dst)
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    coords = [-d for d in reversed(dis)] + [0.0] + dis
    return torch.tensor(coords, dtype=torch.float64)


def target_coords(dst: int) -> torch.Tensor:
    """Official targets: arange(-t, t + 0.1, 1) with t = dst // 2 (dst is odd, so dst points)."""
    t = dst // 2
    return torch.arange(-t, t + 1, dtype=torch.float64)


def cubic_spline_matrix(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Matrix M [len(t), len(x)] with M @ y = not-a-knot cubic spline through (x, y) evaluated at t (clamped)."""
    n = x.numel()
    t = t.clamp(float(x[0]), float(x[-1]))
    if n < 4:  # the not-a-knot spline degenerates to the interpolating polynomial
        m = torch.ones(t.numel(), n, dtype=torch.float64)
        for j in range(n):
            for k in range(n):
                if k != j:
                    m[:, j] *= (t - x[k]) / (x[j] - x[k])
        return m
    h = x[1:] - x[:-1]
    # Second derivatives s = A^-1 B y: interior continuity rows + not-a-knot rows (s''' continuous at x1, x_{n-2}).
    a = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        b[i, i - 1], b[i, i], b[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
    a[-1, -3], a[-1, -2], a[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    s = torch.linalg.solve(a, b)  # [n, n]: second derivatives per unit data vector
    idx = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)
    x0, x1, hi = x[idx], x[idx + 1], h[idx]
    u, v = x1 - t, t - x0
    eye = torch.eye(n, dtype=torch.float64)
    y0, y1, s0, s1 = eye[idx], eye[idx + 1], s[idx], s[idx + 1]
    c = lambda z: z[:, None]  # noqa: E731
    return (c(u ** 3 / (6 * hi)) * s0 + c(v ** 3 / (6 * hi)) * s1
            + c(u / hi) * y0 - c(u * hi / 6) * s0 + c(v / hi) * y1 - c(v * hi / 6) * s1)


def resize_rel_pos_table(table: torch.Tensor, src_window: int | Sequence[int],
                         dst_window: int | Sequence[int]) -> torch.Tensor:
    """Resize a relative position bias table [(2Wh-1)(2Ww-1)+3, heads] from ``src_window`` to ``dst_window``.

    Windows are patch grids (Wh, Ww) (an int means square). Equal windows return the table unchanged.
    """
    src, dst = to_2tuple(src_window), to_2tuple(dst_window)
    if table.dim() != 2 or table.shape[0] != table_rows(src):
        raise ValueError(f"table of shape {tuple(table.shape)} does not belong to a {src[0]}x{src[1]} window "
                         f"({table_rows(src)} rows expected)")
    if src == dst:
        return table
    sh, sw = 2 * src[0] - 1, 2 * src[1] - 1
    dh, dw = 2 * dst[0] - 1, 2 * dst[1] - 1
    extra = table[-NUM_EXTRA:]
    grid = table[:-NUM_EXTRA].double().reshape(sh, sw, -1).permute(2, 0, 1)  # [heads, sh, sw]
    mh = cubic_spline_matrix(source_coords(sh, dh), target_coords(dh))
    mw = cubic_spline_matrix(source_coords(sw, dw), target_coords(dw))
    out = mh @ grid @ mw.t()  # [heads, dh, dw]
    out = out.permute(1, 2, 0).reshape(dh * dw, -1).to(table.dtype)
    return torch.cat([out, extra], dim=0)


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """Absolute position embedding [1, 1+N, D]: CLS kept, patch grid bicubic (align_corners=False), as official."""
    src, dst = to_2tuple(src_grid), to_2tuple(dst_grid)
    if src == dst:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(dst), old_size=list(src), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)


def resize_state_dict(state: dict[str, torch.Tensor], src_grid: Sequence[int], dst_grid: Sequence[int]
                      ) -> dict[str, torch.Tensor]:
    """Every `*relative_position_bias_table` and `pos_embed` of a BEiT ViT state dict moved to ``dst_grid``."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("relative_position_bias_table"):
            out[k] = resize_rel_pos_table(v, src_grid, dst_grid)
        elif k.split(".")[-1] == "pos_embed" and v.shape[1] == src_grid[0] * src_grid[1] + 1:
            out[k] = resize_pos_embed(v, src_grid, dst_grid)
    return out


SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def shared_table_to_per_layer(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The pre-training layout's one shared table copied into every block (official fine-tuning: each block then
    learns its own); a state dict without a shared table is returned unchanged."""
    out = dict(state)
    if SHARED_TABLE in out:
        table = out.pop(SHARED_TABLE)
        for i in range(depth):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return out


# ------------------------------------------------------------------------------------------------ the bias gather

@torch.library.custom_op("beitv2::rel_pos_bias", mutates_args=())
def rel_pos_bias(table: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    """The attention bias [heads, tokens, tokens] of a relative position table [rows, heads] and its index
    [tokens, tokens] (timm's `RelativePositionBias.forward`, the same values).

    An opaque op, so that torch.compile keeps the gather as one small kernel per forward: Inductor otherwise inlines
    the cheap-looking gather into every block's softmax, where it becomes a scalar indirect load per element, batch
    item and head, repeated in the softmax's passes and again in the backward recomputation (docs/training.md
    measures the cost). Its backward scatters the bias gradient into the table rows with `index_add_`."""
    return table[index.reshape(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous()


@rel_pos_bias.register_fake
def _rel_pos_bias_shape(table: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    return table.new_empty((table.shape[1], tokens, tokens))


def _rel_pos_bias_setup(ctx, inputs, output) -> None:
    table, index, _ = inputs
    ctx.save_for_backward(index)
    ctx.rows = table.shape[0]


def _rel_pos_bias_backward(ctx, grad: torch.Tensor):
    (index,) = ctx.saved_tensors
    heads = grad.shape[0]
    per_pair = grad.permute(1, 2, 0).reshape(-1, heads)
    return per_pair.new_zeros((ctx.rows, heads)).index_add_(0, index.reshape(-1), per_pair), None, None


rel_pos_bias.register_autograd(_rel_pos_bias_backward, setup_context=_rel_pos_bias_setup)
