"""`beitv2 finetune`: fine-tune a pre-trained backbone for image classification.

Defaults are the official BEiT v2 base recipe for a 300-epoch pre-training: mean pooling + fc_norm
head initialised at scale 0.001, per-block relative position tables copied from the shared one, layer-wise lr decay
0.65, drop path 0.1, AdamW lr 5e-4 (no batch scaling), weight decay 0.05, 5 warmup epochs, cosine to 1e-6, 100 epochs;
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1; evaluation
every epoch (top-1/top-5, EMA too when enabled), best model kept in ``best/``. Writes metrics.json and
confusion_matrix.png. ``--preset finetune_small_cpu`` is a recipe for small data sets on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..checkpoint import save_model
from ..config import check, opt
from ..data import DataConfig, collate_skip_bad
from ..data.transforms import ERASE_MODES, EvalTransform, ImageSpec, RandomErasing, resolve_norm
from ..engine import (
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    Trainer,
    build_optimizer,
    cleanup,
    init_distributed,
    seed_everything,
)
from ..eval.finetune import (
    ClassificationTask,
    FinetuneModelConfig,
    WithEMA,
    build_finetune_model,
    check_img_size,
    classifier_of,
    ema_of,
    final_report,
    finetune_config,
    layer_id_fn,
    read_finetune_source,
)
from ..eval.metrics import write_metrics
from ..eval.normalization import resolve_normalize
from ..eval.plots import save_confusion_matrix
from ..eval.splits import build_split, data_for_model, eval_transform
from ._training import check_rerun, configure_parser, quiet_other_ranks, resolve_config

HELP = "fine-tune a pre-trained backbone for classification (official BEiT v2 recipe)"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.finetune")


@dataclass
class FinetuneAugConfig:
    """Training augmentation (timm `create_transform`) and Mixup/CutMix (timm `Mixup`) (``--aug.*``)."""

    min_crop_scale: float = opt(0.08, "RandomResizedCrop minimum scale")
    hflip: float = opt(0.5, "horizontal flip probability")
    rand_aug: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' = none, then color_jitter applies)")
    color_jitter: float = opt(0.4, "ColorJitter strength, used only without RandAugment (as timm)")
    reprob: float = opt(0.25, "random erasing probability")
    remode: str = opt("pixel", "random erasing fill mode: pixel, rand or const")
    recount: int = opt(1, "random erasing count")
    interpolation: str = opt("bicubic", "resize interpolation")
    crop_pct: float = opt(0.0, "evaluation: resize to size / crop_pct, centre crop (0 = official: 0.875 below "
                               "384 px, else 1.0)")
    small_image_rule: bool = opt(True, "official rule for inputs of 32 px or less: train with RandomCrop(size, "
                                       "padding=4) instead of RandomResizedCrop, evaluate without resizing (crop_pct "
                                       "and min_crop_scale unused); false = the large-image path at every size")
    normalize: str = opt("auto", "input normalisation: auto (the pre-training run's, else imagenet = official "
                                 "--imagenet_default_mean_and_std), imagenet, inception, clip or none")
    mixup: float = opt(0.8, "Mixup alpha (0 = off)")
    cutmix: float = opt(1.0, "CutMix alpha (0 = off)")
    mixup_prob: float = opt(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = opt(0.5, "probability of CutMix instead of Mixup when both are on")
    mixup_mode: str = opt("batch", "batch, pair or elem")
    smoothing: float = opt(0.1, "label smoothing")

    def validate(self, prefix: str = "aug.") -> None:
        check(0 < self.min_crop_scale <= 1, prefix + "min_crop_scale", "must be in (0, 1]")
        check(0 <= self.hflip <= 1, prefix + "hflip", "must be in [0, 1]")
        check(not self.rand_aug or self.rand_aug.startswith("rand"), prefix + "rand_aug",
              f"a timm RandAugment string like rand-m9-mstd0.5-inc1, got {self.rand_aug!r}")
        check(0 <= self.reprob <= 1, prefix + "reprob", "must be in [0, 1]")
        check(self.remode in ERASE_MODES, prefix + "remode",
              f"pixel, rand or const, got {self.remode!r}")
        check(self.recount >= 1, prefix + "recount", "must be >= 1")
        check(0 <= self.crop_pct <= 1, prefix + "crop_pct", "must be in [0, 1] (0 = official rule)")
        check(self.normalize in ("auto", "imagenet", "inception", "clip", "none"), prefix + "normalize",
              f"auto, imagenet, inception, clip or none, got {self.normalize!r}")
        check(self.mixup >= 0 and self.cutmix >= 0, prefix + "mixup", "alphas must be >= 0")
        check(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1, prefix + "mixup_prob",
              "probabilities must be in [0, 1]")
        check(self.mixup_mode in ("batch", "pair", "elem"), prefix + "mixup_mode", "batch, pair or elem")
        check(0 <= self.smoothing < 1, prefix + "smoothing", "must be in [0, 1)")

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class EMAConfig:
    enabled: bool = opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3; official "
                               "--model_ema) and evaluate it too")
    decay: float = opt(0.9999, "EMA decay per optimizer step")

    def validate(self, prefix: str = "ema.") -> None:
        check(0 < self.decay < 1, prefix + "decay", "must be in (0, 1)")


def finetune_optim_defaults() -> OptimConfig:
    return OptimConfig(lr=5e-4, min_lr=1e-6, weight_decay=0.05, warmup_epochs=5.0, layer_decay=0.65,
                       official_no_decay=True)


def finetune_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/finetune", epochs=100, batch_size=128)


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig, metadata={"help": "model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "labelled images"})
    aug: FinetuneAugConfig = field(default_factory=FinetuneAugConfig, metadata={"help": "augmentation"})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"help": "model EMA"})
    optim: OptimConfig = field(default_factory=finetune_optim_defaults, metadata={"help": "optimizer"})
    train: TrainConfig = field(default_factory=finetune_train_defaults, metadata={"help": "loop"})

    def validate(self, prefix: str = "") -> None:
        check(self.data.kind != "wds" or self.model.num_classes > 0, "model.num_classes",
              "required with data.kind wds (a stream's classes are not known in advance)")
        if self.aug.mixup_active and self.aug.mixup_mode != "elem":
            check(self.train.batch_size % 2 == 0, "train.batch_size", "must be even with Mixup/CutMix (timm)")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, FinetuneConfig)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, keeping its old meaning for 0 bits (a black image, as older Pillow and TensorFlow give):
    ``inc1`` policies reach 0 bits at magnitude 10, which recent Pillow (13) rejects with a ValueError."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


SMALL_IMAGE_MAX = 32  # official `build_transform`: resize_im = input_size > 32


def is_small_image(a: FinetuneAugConfig, img_hw: tuple[int, int]) -> bool:
    return a.small_image_rule and max(img_hw) <= SMALL_IMAGE_MAX


def train_transform(a: FinetuneAugConfig, img_hw: tuple[int, int], channels: int, normalize: str):
    """timm `create_transform(is_training=True)`: RandomResizedCrop, flip, RandAugment, normalise, RandomErasing.

    For inputs of 32 px or less (``small_image_rule``) the first step is ``RandomCrop(size, padding=4)``, as the
    official `build_transform` does (CIFAR-style). The view leaves the worker as a uint8 tensor; normalising and
    RandomErasing (noise in the normalised space, as timm's prefetcher applies it) run on the device, once per batch
    (``specs``, see `beitv2.data.transforms.ImageSpec`)."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    from torchvision import transforms

    norm = resolve_norm(normalize, channels) or ((0.0,) * channels, (1.0,) * channels)
    tf = create_transform((channels, *img_hw), is_training=True, scale=(a.min_crop_scale, 1.0), hflip=a.hflip,
                          color_jitter=a.color_jitter, auto_augment=a.rand_aug or None, interpolation=a.interpolation,
                          mean=norm[0], std=norm[1], re_prob=0.0, use_prefetcher=True)
    erasing = RandomErasing(a.reprob, a.remode, a.recount) if a.reprob > 0 else None
    tf.specs = (ImageSpec(norm, erasing),)
    if is_small_image(a, img_hw):
        tf.transforms[0] = transforms.RandomCrop(img_hw, padding=4)
    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return tf


def criterion_and_mixup(a: FinetuneAugConfig, num_classes: int):
    """Official choice: SoftTargetCrossEntropy with Mixup, else LabelSmoothingCrossEntropy, else cross-entropy."""
    import torch
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if a.mixup_active:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if a.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=a.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def _history(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("type", "time")} for r in rows if r.get("type") == "val"]


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(FinetuneConfig, args))


def execute(cfg: FinetuneConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    check_rerun(cfg, arch=("model.",))
    dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
    quiet_other_ranks(dist.rank)
    try:
        seed_everything(cfg.train.seed)  # the same head init on every rank
        source = read_finetune_source(cfg.model)
        src_cfg = source[0]
        check_img_size(cfg.model, src_cfg.patch_size)
        data = data_for_model(cfg.data, src_cfg.in_chans)
        img_hw = finetune_config(src_cfg, cfg.model, 1).img_hw
        crop_pct = cfg.aug.crop_pct or (0.875 if max(img_hw) < 384 else 1.0)
        norm = resolve_normalize(cfg.aug.normalize, cfg.model)
        train_set, classes = build_split(data, "train", train_transform(cfg.aug, img_hw, src_cfg.in_chans, norm))
        val_set = None
        if data.val_path or data.val_fraction > 0 or data.kind == "fmnist":
            if is_small_image(cfg.aug, img_hw):  # official: no resize; a centre crop only if sizes differ
                ev_tf = EvalTransform(img_hw, interpolation_name=cfg.aug.interpolation, normalize=norm,
                                      channels=src_cfg.in_chans, resize=False)
            else:
                ev_tf = eval_transform(finetune_config(src_cfg, cfg.model, 1), crop_pct, norm,
                                       cfg.aug.interpolation)
            val_set, _ = build_split(data, "val", ev_tf, classes)
        else:
            log.warning("no validation split (set data.val_path or data.val_fraction): no evaluation, no best/")
        num_classes = cfg.model.num_classes or len(classes) or int(max(train_set.labels)) + 1
        net, report = build_finetune_model(cfg.model, num_classes, source)
        model = WithEMA(net, cfg.ema.decay) if cfg.ema.enabled else net
        criterion, mixup = criterion_and_mixup(cfg.aug, num_classes)
        out = Path(cfg.train.output_dir)
        task = ClassificationTask(model, criterion, mixup, out, dist.is_main, classes)
        layer_decay = partial(build_optimizer, layer_id_fn=layer_id_fn(net.depth, "net." if cfg.ema.enabled else ""),
                              num_layers=net.depth + 2)
        trainer = Trainer(task, train_set, cfg.train, cfg.optim, dist=dist, run_config=cfg, val_set=val_set,
                          collate_fn=collate_skip_bad, num_workers=data.num_workers, optimizer=layer_decay,
                          after_step=(model.update_ema,) if cfg.ema.enabled else ())
        result = trainer.fit()
        if result.status != "finished":
            if dist.is_main:
                log.info("%s at step %d; resume from %s", result.status, result.global_step, result.checkpoint)
            return 0
        if val_set is not None and (task.last_eval is None or task.last_eval["step"] + 1 != result.global_step):
            trainer.evaluate()  # the final model was not evaluated yet (eval_every_epochs / resumed run)
        if dist.is_main:
            _write_outputs(out, task, net, model, report, classes, num_classes, result.global_step, norm)
        return 0
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        cleanup()


def _write_outputs(out: Path, task: ClassificationTask, net, model, report: dict, classes: list[str],
                   num_classes: int, global_step: int, norm: str) -> None:
    recorded = {"class_names": json.dumps(list(classes)), "normalize": norm}  # for the timm / HF exports
    save_model(out / "model.safetensors", classifier_of(model), extra=recorded)  # a plain `vit` file
    ema = ema_of(model)
    if ema is not None:
        save_model(out / "model_ema.safetensors", ema, extra=recorded)
    metrics = {"global_step": global_step, "num_classes": num_classes, "classes": classes, "normalize": norm,
               "model": {k: v for k, v in report.items() if k not in ("missing", "unexpected")},
               "freshly_initialised": sorted({k.rsplit(".", 1)[0] for k in report.get("missing", [])})}
    metrics.update(final_report(task, num_classes))
    metrics["history"] = _history(out)
    if "confusion_matrix" in metrics:
        import numpy as np

        save_confusion_matrix(np.array(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png",
                              "fine-tuned")
    write_metrics(out / "metrics.json", metrics)
    log.info("fine-tuning done: top-1 %.2f%% (best %.2f%% at epoch %s); outputs in %s",
             metrics.get("acc1", float("nan")), float(task.best.get("acc1", float("nan"))), task.best.get("epoch"), out)
