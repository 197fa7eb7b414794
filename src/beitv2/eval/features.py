"""Frozen backbones and their image features, shared by `beitv2 linprobe`, `beitv2 knn` and `beitv2 finetune`.

A backbone comes from a checkpoint of this project (`mim` pre-training -> its ViT without the MIM head, `vit`,
`vqkd` -> its encoder, as the official ``--model_filter_name encoder``) or from an untrained preset (a baseline).
Features are read from any block in one forward pass: the CLS token, the mean of the patch tokens, or both
concatenated, after the model's final LayerNorm (``norm`` for CLS-pooled models, ``fc_norm`` for mean-pooled ones
such as the VQ-KD encoder).

Without augmentation the features of a split never change, so they are computed once (sharded over ranks under
torchrun) and kept in memory, optionally in a safetensors file named by a fingerprint of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..config import ConfigError, check, opt, reading, to_dict
from ..data import DataConfig, EvalTransform, build_dataset, collate_skip_bad, prepare_batch
from ..data.samples import TransformDataset, for_loader
from ..engine import distributed as D
from ..engine.precision import autocast, resolve_precision
from ..models.backbone import BEiTViT, ViTConfig
from ..models.registry import ModelKind, get_kind, kinds
from ..utils.distributed import rank_and_world

log = logging.getLogger("beitv2.eval")

FeatureKind = Literal["cls", "mean", "cls+mean", "cls+grid2", "cls+grid3"]
GRID_FEATURES = {"cls+grid2": 2, "cls+grid3": 3}  # CLS + patch tokens average-pooled to a g x g grid


# ------------------------------------------------------------------------------------------------------- source

@dataclass
class ModelSource:
    """Where the backbone comes from (``--model.*``)."""

    checkpoint: str = opt("", "beitv2 model file or checkpoint folder (kinds mim, vit, vqkd); finetune also reads "
                              "official .pth files")
    filter: str = opt("", "'' = automatic (vqkd -> encoder), 'encoder' = keep the keys under 'encoder.' "
                          "(official --model_filter_name)")
    preset: str = opt("", "with random_init: an untrained preset as a baseline (beitv2.models.presets)")
    random_init: bool = opt(False, "use the untrained `preset` instead of a checkpoint")

    def validate(self, prefix: str = "model.") -> None:
        check(self.filter in ("", "encoder"), prefix + "filter", f"must be '' or 'encoder', got {self.filter!r}")
        if self.random_init:
            check(bool(self.preset), prefix + "preset", "name the preset to initialise randomly")
            check(not self.checkpoint, prefix + "checkpoint", "give either a checkpoint or random_init, not both")
            from ..models.presets import list_presets

            check(self.preset in list_presets(), prefix + "preset",
                  f"unknown preset {self.preset!r} (known: {', '.join(list_presets())})")
        else:
            check(not self.preset, prefix + "preset", "only used with random_init true (an untrained baseline)")
            check(bool(self.checkpoint), prefix + "checkpoint",
                  "required (or set random_init true with a preset for an untrained baseline)")
            check(os.path.exists(self.checkpoint) or self.checkpoint.startswith("hf-hub:"), prefix + "checkpoint",
                  f"not found: {self.checkpoint}")


def _with_backbone(kind: str, field: str, where: str) -> ModelKind:
    spec = get_kind(kind) if kind in kinds() else None
    if spec is None or spec.backbone is None:
        known = ", ".join(k for k in kinds() if get_kind(k).backbone is not None)
        raise ConfigError(f"{field}: {where} is a {kind!r} model; expected one with a ViT backbone ({known})")
    return spec


def backbone_from_kind(kind: str, cfg_dict: dict, state: dict[str, torch.Tensor], filt: str, where: str
                       ) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(ViT config, ViT state dict) of a beitv2 model file of any kind with a ViT backbone (the registry says where
    it sits: a VQ-KD's encoder, a MIM model without its pre-training head, ...)."""
    from ..config import from_dict

    if filt == "encoder" and kind != "vqkd":
        raise ConfigError(f"model.filter: 'encoder' needs a vqkd checkpoint, {where} is a {kind!r} model")
    spec = _with_backbone(kind, "model.checkpoint", where)
    return spec.backbone_config(from_dict(spec.config_class, cfg_dict)), spec.backbone_state(state)


def read_source(src: ModelSource) -> tuple[ViTConfig, dict[str, torch.Tensor] | None, str]:
    """(ViT config, weights or None for random init, description) without building the model."""
    if src.random_init:
        from ..models.presets import get_preset

        kind, cfg = get_preset(src.preset)
        cfg = _with_backbone(kind, "model.preset", f"preset {src.preset!r}").backbone_config(cfg)
        return cfg, None, f"random init of preset {src.preset}"
    from ..checkpoint import load_state_dict, read_metadata, resolve_weights

    with reading("model.checkpoint"):
        path = resolve_weights(src.checkpoint)
        if path.suffix != ".safetensors":
            raise ConfigError(f"model.checkpoint: {path} is not a beitv2 safetensors file (official .pth files: use "
                              "`beitv2 convert` first, or `beitv2 finetune`)")
        meta = read_metadata(path)
        if "kind" not in meta or "config" not in meta:
            raise ConfigError(f"model.checkpoint: {path} has no beitv2 metadata (kind/config)")
        cfg, state = backbone_from_kind(meta["kind"], json.loads(meta["config"]), load_state_dict(path), src.filter,
                                        str(path))
    return cfg, state, f"{meta['kind']} checkpoint {path}"


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

    from ..checkpoint import read_metadata, resolve_weights

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


def load_backbone(src: ModelSource) -> tuple[BEiTViT, str]:
    """A frozen ViT (eval mode, no gradients, no classifier) and a description of where it came from."""
    cfg, state, desc = read_source(src)
    cfg.num_classes = 0
    model = BEiTViT(cfg)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        with reading("model.checkpoint"):
            missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"model.checkpoint: {desc}: weights do not match its ViT config: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
    model.eval().requires_grad_(False)
    return model, desc


# ----------------------------------------------------------------------------------------------------- features

@dataclass
class FeatureConfig:
    """What to read from the frozen backbone (``--features.*``)."""

    feature: FeatureKind = opt("cls+mean", "CLS token, mean of patch tokens, or both concatenated; cls+grid2 / "
                                           "cls+grid3: CLS and the patch tokens average-pooled to a 2x2 / 3x3 grid "
                                           "(keeps where things are: small images, few patches)")
    layers: tuple[int, ...] = opt((), "blocks (1-based) to read, all in one pass; empty = the last block")
    final_norm: bool = opt(True, "apply the model's final LayerNorm to the tokens of every chosen block "
                                 "(False: raw block outputs)")
    batch_size: int = opt(128, "images per extraction batch")
    cache_dir: str = opt("", "also keep extracted features in this folder (safetensors, named by a fingerprint of "
                             "model, data and options); reused when present")

    def validate(self, prefix: str = "features.") -> None:
        check(self.feature in ("cls", "mean", "cls+mean", *GRID_FEATURES), prefix + "feature",
              f"must be cls, mean, cls+mean, cls+grid2 or cls+grid3, got {self.feature!r}")
        check(all(int(x) >= 1 for x in self.layers), prefix + "layers", f"blocks are 1-based, got {self.layers}")
        check(len(set(self.layers)) == len(self.layers), prefix + "layers", f"duplicates in {self.layers}")
        check(self.batch_size >= 1, prefix + "batch_size", "must be >= 1")

    def resolve_layers(self, depth: int) -> tuple[int, ...]:
        layers = tuple(int(x) for x in self.layers) or (depth,)
        bad = [x for x in layers if x > depth]
        if bad:
            raise ConfigError(f"features.layers: {bad} beyond the model's depth {depth}")
        return layers


def feature_dim(model: BEiTViT, feature: str) -> int:
    g = GRID_FEATURES.get(feature)
    return model.embed_dim * (1 + g * g if g else 2 if feature == "cls+mean" else 1)


def pool_tokens(model: BEiTViT, tokens: torch.Tensor, feature: str, final_norm: bool = True) -> torch.Tensor:
    """[B, 1+N, D] tokens of one block -> [B, F] float features."""
    if not final_norm:
        cls, mean = tokens[:, 0], tokens[:, 1:].mean(dim=1)
    elif model.cfg.use_mean_pooling:  # norm is Identity: fc_norm is the final LayerNorm
        cls, mean = model.fc_norm(tokens[:, 0]), model.fc_norm(tokens[:, 1:].mean(dim=1))
    else:
        t = model.norm(tokens)
        cls, mean = t[:, 0], t[:, 1:].mean(dim=1)
    g = GRID_FEATURES.get(feature)
    if g:
        patches = tokens[:, 1:] if not final_norm else (model.fc_norm(tokens[:, 1:]) if model.cfg.use_mean_pooling
                                                        else model.norm(tokens[:, 1:]))
        fmap = patches.transpose(1, 2).reshape(len(tokens), -1, *model.grid_size)
        return torch.cat([cls, torch.nn.functional.adaptive_avg_pool2d(fmap.float(), g).flatten(1)], -1).float()
    out = {"cls": cls, "mean": mean}.get(feature)
    if out is None:
        out = torch.cat([cls, mean], dim=-1)
    return out.float()


def layer_features(model: BEiTViT, images: torch.Tensor, layers: Sequence[int], feature: str,
                   final_norm: bool = True) -> dict[int, torch.Tensor]:
    """Features of every block in ``layers`` from one forward pass."""
    early = [x for x in layers if x != model.depth]
    last, saved = model.forward_features(images, return_layers=early)
    saved[model.depth] = last
    return {x: pool_tokens(model, saved[x], feature, final_norm) for x in layers}


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


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(src: ModelSource) -> dict:
    if src.random_init:
        return {"preset": src.preset, "random_init": True, "seed": torch.initial_seed()}
    from ..checkpoint import resolve_weights

    p = resolve_weights(src.checkpoint)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, "filter": src.filter}


@torch.no_grad()
def extract(model: BEiTViT, dataset: Dataset, layers: Sequence[int], feature: str, *, final_norm: bool = True,
            batch_size: int = 128, num_workers: int = 0, device: torch.device | None = None,
            precision: str = "fp32", progress: bool = False, desc: str = "features"
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Features {layer: [N, F]} and labels [N] of a whole data set (CPU float32), sharded over ranks.

    Unreadable images are dropped (reported by the data set); under torchrun every rank gets the full result,
    gathered as tensors in chunks (`beitv2.engine.distributed.gather_rows`), ordered by rank.
    """
    device = device or torch.device("cpu")
    rank, world = rank_and_world()
    spec = dict(getattr(dataset, "batch_spec", None) or {})  # uint8 images are converted on the device
    if world > 1 and not isinstance(dataset, IterableDataset):
        dataset = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
                        worker_init_fn=D.worker_ignores_stop_signals if num_workers else None)
    model = model.to(device).eval()
    precision = resolve_precision(precision, device)
    feats: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
    labels: list[torch.Tensor] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader) if hasattr(dataset, "__len__") else None, desc=desc, unit="batch",
                   dynamic_ncols=True)
    for batch in loader:
        if "image" not in batch:
            continue
        images = prepare_batch({"image": batch["image"].to(device, non_blocking=True)}, spec)["image"]
        with autocast(device, precision):
            out = layer_features(model, images, layers, feature, final_norm)
        for x in layers:
            feats[x].append(out[x].float().cpu())
        labels.append(batch["label"].long().cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    dim = feature_dim(model, feature)
    local = ({x: torch.cat(v) if v else torch.zeros(0, dim) for x, v in feats.items()},
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    if world == 1:
        return local
    # tensors in chunks, not all_gather_object: pickling every rank's part costs several copies of the whole set
    return {x: D.gather_rows(local[0][x]) for x in layers}, D.gather_rows(local[1])


def cached_extract(cache_dir: str, key: dict, compute) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``compute()`` once per fingerprint: read ``cache_dir/features-<fp>.safetensors`` when present."""
    if not cache_dir:
        return compute()
    from safetensors.torch import load_file, save_file

    from ..utils.files import atomic_write

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
    tf = eval_transform(backbone.cfg, crop_pct, normalize)
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
