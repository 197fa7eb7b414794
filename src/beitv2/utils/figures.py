"""Figures without pyplot: `matplotlib.figure.Figure` directly, so the library never switches the global backend
(``matplotlib.use`` in a library would change a notebook user's backend) and needs no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write


def figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] | None = None, **subplots: Any):
    """(figure, axes) like ``plt.subplots`` (``squeeze=False`` gives a 2-d array of axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **subplots)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), suffix=".png")
