"""The labelled train / val splits of an evaluation and their frozen features: the evaluation transform, class
order shared by both splits, and `features_for_splits` (computed once per split, cached by fingerprint)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..data import DataConfig, EvalTransform, build_dataset
from ..data.samples import TransformDataset, for_loader
from ..models.backbone import BEiTViT, ViTConfig
from .backbones import ModelSource
from .feature_cache import cached_extract, feature_key
from .features import FeatureConfig, extract, feature_dim

log = logging.getLogger("beitv2.eval")


def eval_transform(model_cfg: ViTConfig, crop_pct: float, normalize: str, interpolation: str = "bicubic"
                   ) -> EvalTransform:
    """Resize to size / crop_pct, centre-crop to the model's input size (official evaluation transform)."""
    h, w = model_cfg.img_hw
    return EvalTransform((h, w), resize_size=round(max(h, w) / crop_pct), interpolation_name=interpolation,
                         normalize=normalize, channels=model_cfg.in_chans)


def data_for_model(data: DataConfig, in_chans: int) -> DataConfig:
    """Grayscale sources become 3-channel images unless the model takes 1 channel."""
    if data.channels != in_chans:
        log.info("data.channels %d -> %d to match the model's input channels", data.channels, in_chans)
        data.channels = in_chans
    return data


def build_split(data: DataConfig, split: str, transform: Any, class_names: Sequence[str] | None = None
                ) -> tuple[Any, list[str]]:
    """A dict-sample data set for ``split`` and its class names (val labels follow the train class order)."""
    base = build_dataset(data, split)  # type: ignore[arg-type]
    if base is None:
        raise ConfigError(f"data.val_path: {data.kind!r} source {data.path!r} has no validation split; set "
                          "data.val_path or data.val_fraction")
    classes = list(getattr(base, "classes", []) or [])
    labels = getattr(base, "labels", None)
    if labels is not None and len(labels) and int(np.min(labels)) < 0:
        raise ConfigError(f"data.{'path' if split == 'train' else 'val_path'}: images need class sub-folders "
                          "(labels unknown)")
    if class_names is not None and classes and list(classes) != list(class_names):
        known = {c: i for i, c in enumerate(class_names)}
        extra = [c for c in classes if c not in known]
        if extra:
            raise ConfigError(f"data.val_path: classes {extra[:5]} are not among the training classes")
        remap = np.array([known[c] for c in classes], dtype=np.int64)
        base.labels = remap[np.asarray(base.labels)]
        classes = list(class_names)
    ds = TransformDataset(base, transform, seed=data.seed)
    return for_loader(ds), classes


def num_classes_of(class_names: Sequence[str], *label_sets: torch.Tensor) -> int:
    n = len(class_names)
    for labels in label_sets:
        if labels.numel():
            n = max(n, int(labels.max()) + 1)
    return n


@dataclass
class SplitFeatures:
    train: dict[int, torch.Tensor]
    train_labels: torch.Tensor
    val: dict[int, torch.Tensor]
    val_labels: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.class_names, self.train_labels, self.val_labels)


def features_for_splits(src: ModelSource, fcfg: FeatureConfig, data: DataConfig, backbone: BEiTViT,
                        layers: Sequence[int], crop_pct: float, normalize: str, device: torch.device,
                        precision: str = "fp32", progress: bool = True, splits: Sequence[str] = ("train", "val")
                        ) -> SplitFeatures:
    """Frozen features of the train and val splits (eval transform, no augmentation), cached per fingerprint."""
    tf = eval_transform(backbone.vit_config, crop_pct, normalize)
    out: dict[str, Any] = {}
    classes: list[str] | None = None
    for split in splits:
        ds, names = build_split(data, split, tf, classes)
        classes = classes if classes is not None else names
        key = feature_key(src, fcfg, layers, data, split, crop_pct, normalize)

        def compute(ds=ds, split=split):
            return extract(backbone, ds, layers, fcfg.feature, final_norm=fcfg.final_norm,
                           batch_size=fcfg.batch_size, num_workers=data.num_workers, device=device,
                           precision=precision, progress=progress, desc=f"{split} features")

        out[split] = cached_extract(fcfg.cache_dir, key, compute)
        if len(out[split][1]) == 0:
            raise ConfigError(f"data.{'path' if split == 'train' else 'val_path'}: no readable images in the "
                              f"{split} split")
    empty = ({x: torch.zeros(0, feature_dim(backbone, fcfg.feature)) for x in layers}, torch.zeros(0, dtype=torch.long))
    tr, va = out.get("train", empty), out.get("val", empty)
    return SplitFeatures(tr[0], tr[1], va[0], va[1], list(classes or []))
