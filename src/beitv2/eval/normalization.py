"""The input normalisation of a frozen backbone (``--probe.normalize auto`` and the like): told from its file where
possible, since a backbone fed other statistics than it was trained with loses accuracy silently."""

from __future__ import annotations

import json
import logging

from ..checkpoint import read_metadata, resolve_weights
from ..config import reading
from .backbones import ModelSource

log = logging.getLogger("beitv2.eval")


NORMALIZE_CHOICES = ("auto", "imagenet", "inception", "clip", "none")


def auto_normalize(src: ModelSource) -> str:
    """The input normalisation the backbone was trained with, as far as can be told.

    A VQ-KD encoder sees 2x-1 ('inception' statistics) unless its config says 'imagenet'; a checkpoint inside a run
    folder of this project uses that run's ``aug.normalize`` (config.yaml); otherwise ImageNet statistics (official
    ``--imagenet_default_mean_and_std``).
    """
    if src.random_init or not src.checkpoint:
        return "imagenet"
    import yaml

    with reading("model.checkpoint"):
        path = resolve_weights(src.checkpoint)
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if path.suffix == ".safetensors":
        if meta.get("kind") == "vqkd":
            return "imagenet" if json.loads(meta.get("config", "{}")).get("input_norm") == "imagenet" else "inception"
    for folder in (path.parent, path.parent.parent):
        cfg_file = folder / "config.yaml"
        if cfg_file.is_file():
            try:
                norm = (yaml.safe_load(cfg_file.read_text()) or {}).get("aug", {}).get("normalize")
            except (OSError, yaml.YAMLError, AttributeError):
                norm = None
            if norm in NORMALIZE_CHOICES[1:]:
                log.info("input normalisation %r from %s", norm, cfg_file)
                return norm
    return "imagenet"


def resolve_normalize(value: str, src: ModelSource) -> str:
    return auto_normalize(src) if value == "auto" else value
