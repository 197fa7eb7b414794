"""Image features of a frozen backbone, shared by `beitv2 linprobe`, `beitv2 knn` and the quickstart.

Features are read from any block in one forward pass: the CLS token, the mean of the patch tokens, both
concatenated, or CLS with the patch tokens pooled to a small grid, after the model's final LayerNorm (``norm`` for
CLS-pooled models, ``fc_norm`` for mean-pooled ones such as the VQ-KD encoder). `extract` runs a whole data set,
sharded over ranks under torchrun.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..config import ConfigError, check, opt
from ..data import collate_skip_bad, prepare_batch
from ..engine import distributed as D
from ..engine.precision import autocast, resolve_precision
from ..models.backbone import BEiTViT
from ..utils.distributed import rank_and_world

FeatureKind = Literal["cls", "mean", "cls+mean", "cls+grid2", "cls+grid3"]
GRID_FEATURES = {"cls+grid2": 2, "cls+grid3": 3}  # CLS + patch tokens average-pooled to a g x g grid


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
    elif model.vit_config.use_mean_pooling:  # norm is Identity: fc_norm is the final LayerNorm
        cls, mean = model.fc_norm(tokens[:, 0]), model.fc_norm(tokens[:, 1:].mean(dim=1))
    else:
        t = model.norm(tokens)
        cls, mean = t[:, 0], t[:, 1:].mean(dim=1)
    g = GRID_FEATURES.get(feature)
    if g:
        norm = model.fc_norm if model.vit_config.use_mean_pooling else model.norm
        patches = norm(tokens[:, 1:]) if final_norm else tokens[:, 1:]
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
