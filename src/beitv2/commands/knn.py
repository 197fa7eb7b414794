"""`beitv2 knn`: weighted k-NN classification on frozen features (DINO protocol: l2-normalised features, cosine
similarity, votes weighted by exp(sim / 0.07)), for several k and blocks in one run. Writes metrics.json."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_output_dir, opt, save_yaml
from ..data import DataConfig
from ..engine import cleanup, init_distributed, seed_everything
from ..eval.backbones import ModelSource, load_backbone
from ..eval.features import FeatureConfig
from ..eval.knn import KNNConfig, evaluate_knn
from ..eval.metrics import write_metrics
from ..eval.normalization import resolve_normalize
from ..eval.splits import data_for_model, features_for_splits
from ._training import configure_parser, quiet_other_ranks, resolve_config

HELP = "k-NN classification on frozen features"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.knn")


def _knn_features() -> FeatureConfig:
    return FeatureConfig(feature="cls")  # DINO: the CLS token after the final norm


@dataclass
class RunSection:
    output_dir: str = opt("runs/knn", "where metrics.json goes")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = opt("bf16", "autocast dtype of the feature pass: bf16, fp16 or fp32")
    seed: int = opt(0, "seed (random-init baselines)")
    progress: bool = opt(True, "progress bar")
    dist_timeout_min: float = opt(30.0, "under torchrun/srun: how long a rank waits in a collective, in minutes")

    def validate(self, prefix: str = "run.") -> None:
        check(self.precision in ("bf16", "fp16", "fp32"), prefix + "precision", f"bf16, fp16 or fp32, got "
                                                                                 f"{self.precision!r}")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), prefix + "device",
              f"auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.dist_timeout_min > 0, prefix + "dist_timeout_min", "must be > 0")


@dataclass
class KNNCommandConfig:
    model: ModelSource = field(default_factory=ModelSource, metadata={"help": "frozen backbone"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "labelled images"})
    features: FeatureConfig = field(default_factory=_knn_features, metadata={"help": "what to read"})
    knn: KNNConfig = field(default_factory=KNNConfig, metadata={"help": "k-NN"})
    run: RunSection = field(default_factory=RunSection, metadata={"help": "run"})


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, KNNCommandConfig)


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(KNNCommandConfig, args))


def execute(cfg: KNNCommandConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    check_output_dir(cfg.run.output_dir, "run.output_dir")
    dist = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    quiet_other_ranks(dist.rank)
    try:
        seed_everything(cfg.run.seed)
        backbone, desc = load_backbone(cfg.model)
        layers = cfg.features.resolve_layers(backbone.depth)
        data = data_for_model(cfg.data, backbone.vit_config.in_chans)
        norm = resolve_normalize(cfg.knn.normalize, cfg.model)
        feats = features_for_splits(cfg.model, cfg.features, data, backbone, layers, cfg.knn.crop_pct,
                                    norm, dist.device, cfg.run.precision, cfg.run.progress)
        if dist.is_main:
            metrics = evaluate_knn(feats, cfg.knn, dist.device)
            metrics.update(source=desc, feature=cfg.features.feature, normalize=norm)
            out = Path(cfg.run.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, out / "config.yaml")
            write_metrics(out / "metrics.json", metrics)
            for x, per_k in metrics["layers"].items():
                log.info("k-NN block %s: %s", x, ", ".join(f"k={k} top-1 {v['acc1']:.2f}%" for k, v in per_k.items()))
        return 0
    finally:
        cleanup()
