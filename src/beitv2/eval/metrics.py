"""Classification metrics shared by the evaluation commands: top-k accuracy, confusion matrix, metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_write_text


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1 / top-5 accuracy in percent (top-5 is 100 with 5 classes or fewer, as in timm)."""
    n = max(int(labels.numel()), 1)
    c = topk_correct(logits, labels)
    return {"acc1": 100.0 * c[1] / n, "acc5": 100.0 * c[5] / n}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _clean(v.tolist())
    return v


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """Write ``metrics.json`` atomically."""
    return atomic_write_text(path, json.dumps(_clean(metrics), indent=2) + "\n")
