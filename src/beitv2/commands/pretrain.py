"""`beitv2 pretrain`: masked image modeling against a frozen tokenizer (BEiT v2 with VQ-KD, BEiT v1 with a dVAE).

Defaults reproduce the official ViT-B/16 1600-epoch recipe (beit2/PRETRAINING.md): patch aggregation on
layer 9 with 2 head layers and a shared lm_head, 75 blockwise-masked patches, lr 1.5e-3 with 10 warmup epochs,
clip 3.0, weight decay 0.05, 128 images per GPU. The tokenizer (``--tokenizer.checkpoint``) is a file made by
this project (``beitv2 train-tokenizer`` or ``beitv2 convert``) or, for BEiT v1, OpenAI DALL-E's ``encoder.pkl``;
its labels are computed on the fly, frozen, in eval mode and outside DDP. Ablations (`beitv2.mim_targets`,
docs/ablations.md): ``--model.target pixels`` regresses normalised pixels (no tokenizer), ``--model.target features``
regresses the ``teacher:`` section's features.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import check, opt
from ..data import DataConfig, MIMDataset, TwoViewTransform, build_dataset, collate_skip_bad
from ..data.samples import for_loader
from ..engine import NonFiniteLossError, OptimConfig, TrainConfig, Trainer, cleanup, init_distributed, seed_everything
from ..interop.tokenizer_ref import TokenizerRef
from ..masking import build_mask_generator
from ..mim_targets import build_target
from ..models.architectures import get_architecture
from ..models.mim import BEiTv2ForMIM, MIMConfig
from ..tasks import MIMTask
from ..teachers import TeacherConfig
from ._training import check_rerun, configure_parser, quiet_other_ranks, resolve_config

HELP = "pre-train a ViT by masked image modeling of tokenizer codes (BEiT v2 / v1)"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.pretrain")


@dataclass
class PretrainAugConfig:
    min_crop_scale: float = opt(0.2, "RandomResizedCrop minimum scale (beit2/PRETRAINING.md: 0.2; code default 0.08)")
    color_jitter: float = opt(0.4, "ColorJitter strength (official: hard-coded 0.4)")
    color_jitter_after_crop: bool = opt(True, "jitter the resized crop (cheaper: 224 px instead of the full image) "
                                              "instead of the full image before the crop (official order)")
    hflip: float = opt(0.5, "horizontal flip probability")
    train_interpolation: str = opt("bicubic", "interpolation of the model view")
    second_interpolation: str = opt("bicubic", "interpolation of the tokenizer view (official code default: lanczos)")
    normalize: str = opt("imagenet", "model-view normalisation: imagenet, inception, clip or none")

    def validate(self, prefix: str = "aug.") -> None:
        check(0 < self.min_crop_scale <= 1, f"{prefix}min_crop_scale", f"must be in (0, 1], got {self.min_crop_scale}")
        check(self.color_jitter >= 0, f"{prefix}color_jitter", "must be >= 0")
        check(0 <= self.hflip <= 1, f"{prefix}hflip", "must be in [0, 1]")
        check(self.normalize in ("imagenet", "inception", "clip", "none"), f"{prefix}normalize",
              f"must be imagenet, inception, clip or none, got {self.normalize!r}")


@dataclass
class MaskConfig:
    kind: Literal["block", "random"] = opt("block", "blockwise (BEiT) or uniformly random masking")
    num_masking_patches: int = opt(75, "masked patches per image (official: 75 of 196)")
    min_num_patches: int = opt(16, "smallest block (block masking)")
    max_num_patches: int | None = opt(None, "largest block (None = no limit)")
    min_aspect: float = opt(0.3, "smallest block aspect ratio (the largest is its inverse)")
    top_up: bool = opt(True, "block masking: add random single patches up to exactly num_masking_patches (BEiT v2); "
                             "false = BEiT v1, which keeps the count the blocks reached")

    def validate(self, prefix: str = "mask.") -> None:
        check(self.num_masking_patches >= 1, f"{prefix}num_masking_patches", "must be >= 1")
        check(self.min_num_patches >= 1, f"{prefix}min_num_patches", "must be >= 1")
        check(self.min_aspect > 0, f"{prefix}min_aspect", "must be > 0")


def _model_defaults() -> MIMConfig:
    return get_architecture("beitv2_base_patch16_224")[1]


def _optim_defaults() -> OptimConfig:
    return OptimConfig(lr=1.5e-3, min_lr=1e-5, warmup_epochs=10.0, betas=(0.9, 0.999), weight_decay=0.05,
                       clip_grad=3.0, official_no_decay=True)


def _train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/pretrain", epochs=1600, batch_size=128)


@dataclass
class PretrainConfig:
    model: MIMConfig = field(default_factory=_model_defaults, metadata={"help": "MIM model"})
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef, metadata={"help": "frozen tokenizer"})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "model.target features only"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "images"})
    aug: PretrainAugConfig = field(default_factory=PretrainAugConfig, metadata={"help": "augmentation"})
    mask: MaskConfig = field(default_factory=MaskConfig, metadata={"help": "masking"})
    optim: OptimConfig = field(default_factory=_optim_defaults, metadata={"help": "optimizer"})
    train: TrainConfig = field(default_factory=_train_defaults, metadata={"help": "loop"})

    # set it (or data.channels) and the other follows (`_training.follow_channels`)
    CHANNEL_FIELDS: ClassVar[tuple[str, ...]] = ("model.backbone.in_chans",)

    def validate(self, prefix: str = "") -> None:
        """Cross-section checks, all before any model is built."""
        b = self.model.backbone
        grid = b.grid_size
        n = grid[0] * grid[1]
        check(self.data.channels == b.in_chans, "data.channels",
              f"{self.data.channels}, but model.backbone.in_chans is {b.in_chans}; set one of them (the other "
              "follows) or both to the same value")
        if self.model.target == "tokens":
            check(bool(self.tokenizer.checkpoint), "tokenizer.checkpoint",
                  "required (a tokenizer made by this project) for model.target tokens")
            _, tgrid, vocab, _, chans = self.tokenizer.describe()
            check(tgrid == grid, "tokenizer.checkpoint",
                  f"tokenizer grid {tgrid[0]}x{tgrid[1]} != model grid {grid[0]}x{grid[1]} "
                  f"(model.backbone.img_size / patch_size)")
            check(vocab == self.model.vocab_size, "model.vocab_size",
                  f"{self.model.vocab_size} differs from the tokenizer's {vocab} codes")
            check(chans == b.in_chans, "tokenizer.checkpoint",
                  f"the tokenizer takes {chans}-channel images, data.channels is {b.in_chans}; pass --data.channels "
                  f"{chans} or a tokenizer trained with --data.channels {b.in_chans}")
        else:
            check(not self.tokenizer.checkpoint, "tokenizer.checkpoint",
                  f"unused with model.target {self.model.target}; leave it empty")
        check(self.mask.num_masking_patches <= n, "mask.num_masking_patches",
              f"{self.mask.num_masking_patches} masked patches > {n} patches of the {grid[0]}x{grid[1]} grid")
        check(self.mask.min_num_patches <= self.mask.num_masking_patches, "mask.min_num_patches",
              f"{self.mask.min_num_patches} > num_masking_patches {self.mask.num_masking_patches}")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(PretrainConfig, args))


def execute(cfg: PretrainConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    check_rerun(cfg, arch=("model.",))
    dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
    quiet_other_ranks(dist.rank)
    try:
        seed_everything(cfg.train.seed)  # identical initial model on every rank
        b = cfg.model.backbone
        target = build_target(cfg)  # its frozen part (tokenizer, teacher) before the model, as the seed expects
        a, m = cfg.aug, cfg.mask
        transform = TwoViewTransform(b.img_hw, target.second_size, a.min_crop_scale, 1.0, color_jitter=a.color_jitter,
                                     hflip=a.hflip, train_interpolation=a.train_interpolation,
                                     second_interpolation=a.second_interpolation, normalize=a.normalize,
                                     channels=cfg.data.channels, jitter_after_crop=a.color_jitter_after_crop)
        masks = build_mask_generator(m.kind, b.grid_size, m.num_masking_patches, m.min_num_patches,
                                     m.max_num_patches, m.min_aspect, top_up=m.top_up)
        train_set = MIMDataset(build_dataset(cfg.data, "train"), transform, masks, seed=cfg.data.seed)
        model = BEiTv2ForMIM(cfg.model)
        if dist.is_main:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("MIM model: %.2f M learnable parameters; %s", n / 1e6, target.description)
        trainer = Trainer(MIMTask(model, target), for_loader(train_set), cfg.train, cfg.optim, dist=dist,
                          run_config=cfg, collate_fn=collate_skip_bad, num_workers=cfg.data.num_workers)
        result = trainer.fit()
        if dist.is_main:
            log.info("%s after %d steps (last: %s)", result.status, result.global_step,
                     {k: round(v, 4) for k, v in result.last_metrics.items()})
        return result.exit_code
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        cleanup()
