"""Batches from samples that may be missing (unreadable images)."""

from __future__ import annotations

from typing import Any

from torch.utils.data._utils.collate import default_collate


def collate_skip_bad(batch: list[Any]) -> dict[str, Any]:
    """Drop ``None`` samples, collate the rest with torch's default collate and add ``num_skipped``.

    Tuple samples become ``{'image', 'label'}`` (plus ``'index'``, a stream's sample id, for 3-tuples).
    A batch made only of bad samples is ``{'num_skipped': n}``.
    """
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good)
    if not good:
        return {"num_skipped": skipped}
    if not isinstance(good[0], dict):
        good = [{"image": s[0], "label": s[1], **({"index": s[2]} if len(s) > 2 else {})} for s in good]
    out = default_collate(good)
    out["num_skipped"] = skipped
    return out
