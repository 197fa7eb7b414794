"""`beitv2 train-tokenizer`: train a VQ-KD tokenizer against a frozen teacher (BEiT v2), or a dVAE (BEiT v1).

Defaults reproduce the official VQ-KD recipe (beit2/TOKENIZER.md): ViT-B/16 encoder, 3-layer decoder,
8192 x 32 codebook with k-means init, CLIP ViT-B/16 teacher, AdamW betas (0.9, 0.99), lr 5e-5 scaled by
total_batch / 128, min_lr 1e-5, 10 warmup epochs, weight decay 1e-4 (constant), 100 epochs of 64 images per GPU.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..config import check, opt
from ..data import (
    DataConfig,
    EvalTransform,
    TokenizerTrainDataset,
    TokenizerTrainTransform,
    build_dataset,
    collate_skip_bad,
)
from ..data.samples import for_loader
from ..engine import NonFiniteLossError, OptimConfig, TrainConfig, Trainer, cleanup, init_distributed, seed_everything
from ..models.dvae import DiscreteVAE, DVAEConfig
from ..models.vqkd import VQKD, VQKDConfig
from ..tasks import DVAETask, TokenizerTask
from ..teachers import TeacherConfig, build_teacher
from ._training import check_rerun, configure_parser, quiet_other_ranks, resolve_config

HELP = "train a VQ-KD tokenizer (teacher distillation) or a BEiT v1 dVAE"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.train_tokenizer")


@dataclass
class TokenizerSection:
    type: Literal["vqkd", "dvae"] = opt("vqkd", "vqkd (BEiT v2, needs a teacher) or dvae (BEiT v1, pixels)")
    vqkd: VQKDConfig = field(default_factory=VQKDConfig, metadata={"help": "VQ-KD architecture"})
    dvae: DVAEConfig = field(default_factory=DVAEConfig, metadata={"help": "dVAE architecture"})

    @property
    def img_size(self) -> tuple[int, int]:
        return self.vqkd.encoder.img_hw if self.type == "vqkd" else (self.dvae.img_size, self.dvae.img_size)

    @property
    def in_chans(self) -> int:
        return self.vqkd.encoder.in_chans if self.type == "vqkd" else self.dvae.in_chans


@dataclass
class TokenizerAugConfig:
    min_crop_scale: float = opt(0.08, "RandomResizedCrop minimum scale (beit2/TOKENIZER.md: 0.08)")
    color_jitter: float = opt(0.0, "ColorJitter strength (official default 0 = off)")
    color_jitter_after_crop: bool = opt(True, "jitter the resized crop (cheaper) instead of the full image before "
                                              "the crop (official order)")
    hflip: float = opt(0.5, "horizontal flip probability")
    interpolation: str = opt("bicubic", "crop resize interpolation")
    eval_resize: int = opt(0, "validation: resize the short side to this, then centre-crop (0 = size / 0.875)")

    def validate(self, prefix: str = "aug.") -> None:
        check(0 < self.min_crop_scale <= 1, f"{prefix}min_crop_scale", f"must be in (0, 1], got {self.min_crop_scale}")
        check(self.color_jitter >= 0, f"{prefix}color_jitter", "must be >= 0")
        check(0 <= self.hflip <= 1, f"{prefix}hflip", "must be in [0, 1]")


def _optim_defaults() -> OptimConfig:
    return OptimConfig(lr=5e-5, lr_reference_batch=128, min_lr=1e-5, weight_decay=1e-4, warmup_epochs=10.0,
                       betas=(0.9, 0.99), official_no_decay=True)


def _train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/tokenizer", epochs=100, batch_size=64)


@dataclass
class TrainTokenizerConfig:
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection, metadata={"help": "tokenizer"})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "VQ-KD teacher"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "images"})
    aug: TokenizerAugConfig = field(default_factory=TokenizerAugConfig, metadata={"help": "augmentation"})
    optim: OptimConfig = field(default_factory=_optim_defaults, metadata={"help": "optimizer"})
    train: TrainConfig = field(default_factory=_train_defaults, metadata={"help": "loop"})

    # set one of them (or data.channels) and the others follow (`_training.follow_channels`)
    CHANNEL_FIELDS: ClassVar[tuple[str, ...]] = ("tokenizer.vqkd.encoder.in_chans", "tokenizer.dvae.in_chans")

    def validate(self, prefix: str = "") -> None:
        own = "tokenizer.vqkd.encoder.in_chans" if self.tokenizer.type == "vqkd" else "tokenizer.dvae.in_chans"
        check(self.data.channels == self.tokenizer.in_chans, "data.channels",
              f"{self.data.channels}, but {own} is {self.tokenizer.in_chans}; set one of them (the other follows) "
              "or both to the same value")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, TrainTokenizerConfig)


def build_task(cfg: TrainTokenizerConfig) -> torch.nn.Module:
    """The training task of the configured tokenizer type."""
    if cfg.tokenizer.type == "dvae":
        return DVAETask(DiscreteVAE(cfg.tokenizer.dvae))
    vq = cfg.tokenizer.vqkd
    teacher = build_teacher(cfg.teacher, vq.encoder.grid_size)
    check(teacher.feature_dim == vq.teacher_dim, "tokenizer.vqkd.teacher_dim",
          f"{vq.teacher_dim} differs from the teacher's feature width {teacher.feature_dim}")
    return TokenizerTask(VQKD(vq), teacher)


def warn_unused_codes(stats: dict) -> None:
    """One warning line when less than half of the codebook was in use (the last epoch's training vectors)."""
    if stats["usage"] < 0.5:
        log.warning("only %d of %d codes were used in the last epoch (perplexity %.1f); try "
                    "--tokenizer.vqkd.quantizer.use_whole_codebook true (docs/models.md, 'When codes go unused')",
                    stats["codes_used"], stats["codes_used"] + stats["dead_codes"], stats["perplexity"])


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(TrainTokenizerConfig, args))


def execute(cfg: TrainTokenizerConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    check_rerun(cfg, arch=("tokenizer.",))
    dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
    quiet_other_ranks(dist.rank)
    try:
        seed_everything(cfg.train.seed)  # identical models and teacher on every rank
        task = build_task(cfg)  # the teacher first: a hub that cannot be reached fails before the data is read
        size = cfg.tokenizer.img_size
        a = cfg.aug
        train_tf = TokenizerTrainTransform(size, a.min_crop_scale, a.color_jitter, a.hflip, a.interpolation,
                                           jitter_after_crop=a.color_jitter_after_crop)
        train_set = TokenizerTrainDataset(build_dataset(cfg.data, "train"), train_tf, seed=cfg.data.seed)
        val_base = build_dataset(cfg.data, "val")
        val_set = None
        if val_base is not None:
            eval_tf = EvalTransform(size, a.eval_resize or None, a.interpolation, normalize="none",
                                    channels=cfg.data.channels)
            val_set = for_loader(TokenizerTrainDataset(val_base, eval_tf, seed=cfg.data.seed))
        trainer = Trainer(task, for_loader(train_set), cfg.train, cfg.optim, dist=dist, run_config=cfg,
                          val_set=val_set, collate_fn=collate_skip_bad, num_workers=cfg.data.num_workers)
        result = trainer.fit()
        if dist.is_main:
            log.info("%s after %d steps; weights in %s", result.status, result.global_step,
                     cfg.train.output_dir if result.status == "finished" else result.checkpoint)
            if cfg.tokenizer.type == "vqkd" and result.status == "finished":
                warn_unused_codes(trainer.task.model.quantize.usage_stats())
        return result.exit_code
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        cleanup()
