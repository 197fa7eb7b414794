"""The rows of the quickstart's table that are not a ViT backbone (the raw pixels, the CNN stand-in teacher), read
with the backbones' own probe and k-NN, and the row format every backbone shares (`row_scores`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import load_model
from ..config import from_dict
from ..data.fmnist import fashion_mnist_tensors
from ..data.transforms import resolve_norm
from ..engine import OptimConfig, TrainConfig
from ..engine.distributed import init_distributed
from ..eval.features import GRID_FEATURES
from ..eval.knn import KNNConfig, evaluate_knn
from ..eval.linprobe import ProbeConfig, ProbeSettings, fit_probe, probe_optim_defaults, probe_train_defaults
from ..eval.metrics import write_metrics
from ..eval.splits import SplitFeatures
from .configs import linprobe_config
from .plan import NORM, Plan


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _knn_at(metrics: dict, k: int) -> float | None:
    layers = metrics.get("layers", {})
    if not layers:
        return None
    last = layers[max(layers, key=int)]
    v = last.get(str(k))
    return None if v is None else float(v["acc1"])


def row_scores(plan: Plan, lp: dict, knn: dict, checkpoint: str | None) -> dict[str, Any]:
    """One row of the report's table from a linear probe's and a k-NN's metrics: the k-NN at k = 20 (DINO's) when the
    plan scores it, else its best k, and the best k beside it."""
    return {"linprobe_acc1": lp.get("acc1"), "knn_acc1": _knn_at(knn, 20) if 20 in plan.knn_k else knn.get("acc1"),
            "knn_best": {"acc1": knn.get("acc1"), "k": knn.get("best_k")}, "checkpoint": checkpoint}


def raw_pixel_scores(root: str, train_subset: float, test_subset: float, data_seed: int, probe: dict[str, Any],
                     optim: dict[str, Any], train: dict[str, Any], ks: tuple[int, ...], knn_dir: Path,
                     encode: Callable[[torch.Tensor], torch.Tensor] | None = None, source: str = "raw pixels"
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(linear-probe metrics, k-NN metrics) on the normalised pixels (784 numbers) of a Fashion-MNIST subset, or on
    ``encode(images01) -> [B, D]`` of them (the CNN teacher's pooled features).

    ``probe`` / ``optim`` / ``train`` are the ``beitv2 linprobe`` config sections the backbones were probed with, so
    the pixels get the same probe (head, optimizer, schedule, epochs) on the same training / test subsets, and the
    same k-NN vote: the floor any learned feature has to clear. ``train.output_dir`` receives the probe's
    metrics.json, ``knn_dir`` the k-NN's.
    """
    pcfg = from_dict(ProbeConfig, probe)
    norm = resolve_norm(pcfg.normalize if pcfg.normalize != "auto" else NORM, 1)

    def features(is_train: bool, subset: float) -> tuple[Any, Any, list[str]]:
        x, y, classes = fashion_mnist_tensors(root, train=is_train, subset=subset, seed=data_seed)
        if encode is not None:
            return encode(x), y, classes
        if norm is not None:
            x = (x - norm[0][0]) / norm[1][0]
        return x.flatten(1), y, classes

    x_tr, y_tr, classes = features(True, train_subset)
    x_te, y_te, _ = features(False, test_subset)
    feats = SplitFeatures(train={0: x_tr}, train_labels=y_tr, val={0: x_te}, val_labels=y_te, class_names=classes)
    settings = ProbeSettings(pcfg, from_dict(OptimConfig, optim, base=probe_optim_defaults()),
                             from_dict(TrainConfig, train, base=probe_train_defaults()),
                             extra_metrics={"source": source})
    lp = fit_probe(feats, settings, init_distributed("cpu"))
    knn = evaluate_knn(feats, KNNConfig(k=tuple(ks))) | {"source": source}
    knn_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(knn_dir / "metrics.json", knn)
    return lp, knn


def cnn_pooled_encoder(checkpoint: Path, batch: int, feature: str = "cls+mean"
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(images01) -> [B, F]``: the CNN teacher's last feature map, mean-pooled (timm's global pool; a CNN has
    no CLS token), computed in batches without gradients. For a grid ``feature`` (cls+grid3) the map's mean is
    followed by the map average-pooled to that grid, as the ViTs' CLS is by their patch tokens, so every row of the
    table is read the same way."""
    net = load_model(checkpoint)[0].eval()
    grid = GRID_FEATURES.get(feature)

    def pool(fmap: torch.Tensor) -> torch.Tensor:
        mean = fmap.mean((2, 3))
        return torch.cat([mean, F.adaptive_avg_pool2d(fmap, grid).flatten(1)], 1) if grid else mean

    @torch.no_grad()
    def encode(images01: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(net.forward_features(images01[i:i + batch]))
                          for i in range(0, len(images01), batch)])

    return encode


def cnn_teacher_scores(plan: Plan, root: str, checkpoint: Path, out: Path, seed: int, progress: bool
                       ) -> dict[str, Any]:
    """The CNN teacher's row: the same probe and k-NN on its last feature map, pooled as the plan reads the ViTs."""
    grid = GRID_FEATURES.get(plan.probe_feature)
    encode = cnn_pooled_encoder(checkpoint, plan.feature_batch, plan.probe_feature)
    lp_dir, knn_dir = out / "eval" / "teacher" / "linprobe", out / "eval" / "teacher" / "knn"
    cfg = linprobe_config(plan, root, checkpoint, lp_dir, out / "eval" / "features", seed, progress)
    lp, knn = raw_pixel_scores(root, plan.eval_train_subset, plan.test_subset, seed, cfg["probe"], cfg["optim"],
                               cfg["train"], plan.knn_k, knn_dir, encode=encode,
                               source="CNN teacher, last feature map: " + (
                                   f"mean + {grid}x{grid} grid" if grid else "mean-pooled"))
    return row_scores(plan, lp, knn, str(checkpoint))


def raw_pixel_baseline(plan: Plan, root: str, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """The raw-pixels row: the backbones' linear probe and k-NN on the normalised pixels."""
    lp_dir, knn_dir = out / "eval" / "raw_pixels" / "linprobe", out / "eval" / "raw_pixels" / "knn"
    cfg = linprobe_config(plan, root, Path("-"), lp_dir, out / "eval" / "features", seed, progress)
    lp, knn = raw_pixel_scores(root, plan.eval_train_subset, plan.test_subset, seed, cfg["probe"], cfg["optim"],
                               cfg["train"], plan.knn_k, knn_dir)
    return row_scores(plan, lp, knn, None)
