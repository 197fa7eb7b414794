"""`beitv2 linprobe`: linear classifiers on a frozen backbone, one per chosen block, reporting each and the best.

Protocol (the official beit2 code has none; defaults follow BEiT v1's `run_linear_eval`): features =
concat(CLS, mean of patch tokens) after the final LayerNorm; AdamW, lr 1e-3 x total_batch / 256, weight decay 1e-4,
cosine schedule, 100 epochs. Unlike BEiT v1 the default trains on features computed once without augmentation
(``--probe.augment true`` restores RandomResizedCrop + flip). Writes metrics.json and confusion_matrix.png.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from torchvision.transforms import v2

from ..config import check
from ..data import DataConfig, collate_skip_bad
from ..data.transforms import ImageSpec, resolve_norm
from ..engine import OptimConfig, TrainConfig, cleanup, init_distributed, seed_everything
from ..eval.backbones import ModelSource, load_backbone
from ..eval.features import FeatureConfig
from ..eval.linprobe import (
    InLoopFeatures,
    ProbeConfig,
    ProbeSettings,
    fit_probe,
    probe_optim_defaults,
    probe_train_defaults,
)
from ..eval.normalization import resolve_normalize
from ..eval.splits import build_split, data_for_model, features_for_splits
from ._training import check_rerun, configure_parser, quiet_other_ranks, resolve_config

HELP = "linear probe of a frozen backbone (one head per chosen block)"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.linprobe")


@dataclass
class LinProbeConfig:
    model: ModelSource = field(default_factory=ModelSource, metadata={"help": "frozen backbone"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "labelled images"})
    features: FeatureConfig = field(default_factory=FeatureConfig, metadata={"help": "what to read"})
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata={"help": "linear heads"})
    optim: OptimConfig = field(default_factory=probe_optim_defaults, metadata={"help": "optimizer"})
    train: TrainConfig = field(default_factory=probe_train_defaults, metadata={"help": "loop"})

    def validate(self, prefix: str = "") -> None:
        check(not (self.probe.augment and self.data.kind == "wds"), "probe.augment",
              "augmented probing needs a sized data set (folder or fmnist), not WebDataset shards")
        check(self.optim.layer_decay == 1.0, "optim.layer_decay", "heads have no layers; keep 1.0")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, LinProbeConfig)


def augment_transform(img_size: tuple[int, int], min_scale: float, normalize: str, channels: int) -> v2.Compose:
    """BEiT v1 linear-probe training view: RandomResizedCrop (bicubic) + horizontal flip; a uint8 tensor whose
    normalisation (``specs``) runs on the device."""
    ops = [v2.RandomResizedCrop(list(img_size), scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True),
           v2.RandomHorizontalFlip(), v2.PILToTensor()]
    tf = v2.Compose(ops)
    tf.specs = (ImageSpec(resolve_norm(normalize, channels)),)
    return tf


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(LinProbeConfig, args))


def execute(cfg: LinProbeConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    check_rerun(cfg, arch=("model.", "features."))
    dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
    quiet_other_ranks(dist.rank)
    try:
        seed_everything(cfg.train.seed)  # the same random-init baseline on every rank
        backbone, desc = load_backbone(cfg.model)
        layers = cfg.features.resolve_layers(backbone.depth)
        data = data_for_model(cfg.data, backbone.vit_config.in_chans)
        norm = resolve_normalize(cfg.probe.normalize, cfg.model)
        log.info("linear probe of %s, blocks %s, feature %s, normalisation %s", desc, list(layers),
                 cfg.features.feature, norm)
        feats = features_for_splits(cfg.model, cfg.features, data, backbone, layers, cfg.probe.crop_pct,
                                    norm, dist.device, cfg.train.precision, cfg.train.progress,
                                    splits=("val",) if cfg.probe.augment else ("train", "val"))
        in_loop = None
        if cfg.probe.augment:
            tf = augment_transform(backbone.vit_config.img_hw, cfg.probe.min_crop_scale, norm,
                                   backbone.vit_config.in_chans)
            images, _ = build_split(data, "train", tf, feats.class_names)
            in_loop = InLoopFeatures(images, backbone, cfg.features.feature, cfg.features.final_norm,
                                     collate_fn=collate_skip_bad, num_workers=data.num_workers)
        settings = ProbeSettings(cfg.probe, cfg.optim, cfg.train, run_config=cfg, in_loop=in_loop,
                                 extra_metrics={"source": desc, "feature": cfg.features.feature, "normalize": norm})
        fit_probe(feats, settings, dist)
        return 0
    finally:
        cleanup()
