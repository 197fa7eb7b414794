"""Cached features: without augmentation the features of a split never change, so they are kept in a safetensors
file named by a fingerprint of everything they depend on (the backbone file, the options, the data)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import resolve_weights
from ..config import to_dict
from ..data import DataConfig
from ..utils.distributed import rank_and_world
from ..utils.files import atomic_write
from .backbones import ModelSource
from .features import FeatureConfig

log = logging.getLogger("beitv2.eval")


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(src: ModelSource) -> dict:
    if src.random_init:
        return {"preset": src.preset, "random_init": True, "seed": torch.initial_seed()}
    p = resolve_weights(src.checkpoint)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, "filter": src.filter}


def cached_extract(cache_dir: str, key: dict, compute) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``compute()`` once per fingerprint: read ``cache_dir/features-<fp>.safetensors`` when present."""
    if not cache_dir:
        return compute()
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"features-{key.get('split', 'x')}-{_fingerprint(key)}.safetensors"
    if path.is_file():
        log.info("reading cached features %s", path)
        t = load_file(str(path))
        return {int(k[6:]): v for k, v in t.items() if k.startswith("layer_")}, t["labels"]
    feats, labels = compute()
    if rank_and_world()[0] == 0:
        tensors = {f"layer_{x}": v.contiguous() for x, v in feats.items()}
        tensors["labels"] = labels.contiguous()
        meta = {"key": json.dumps(key, sort_keys=True, default=str)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        log.info("cached features in %s", path)
    return feats, labels


def feature_key(src: ModelSource, fcfg: FeatureConfig, layers: Sequence[int], data: DataConfig, split: str,
                crop_pct: float, normalize: str) -> dict:
    return {"source": source_fingerprint(src), "feature": fcfg.feature, "layers": list(layers),
            "final_norm": fcfg.final_norm, "data": to_dict(data), "split": split, "crop_pct": crop_pct,
            "normalize": normalize}
