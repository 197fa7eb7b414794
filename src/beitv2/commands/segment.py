"""`beitv2 segment`: semantic segmentation with UperNet on a BEiT backbone (the BEiT v2 ADE20K protocol).

Defaults are the official BEiT v2 base recipe (ImageNet-1k pre-training -> ADE20K): 512 x 512 crops, out_indices
4 6 8 12, UperNet 768 wide + FCN auxiliary head (0.4), AdamW (0.9, 0.999) lr 5e-5, weight decay 0.05, layer decay
0.75, drop path 0.15, 160k iterations of batch 16 with poly decay (power 1) after 1,500 linear warmup iterations,
evaluation every 16k iterations by sliding windows (512, stride 341). Recipes: ``seg_base_ade20k``,
``seg_base_ade20k_in21k``, ``seg_large_ade20k``, ``seg_large_ade20k_in21k`` and the CPU recipe
``seg_fmnist_cpu``. Writes metrics.jsonl / metrics.json, eval_table.md (per-class IoU), predictions.png and
model.safetensors (kind ``segmenter``, with the class names, input normalisation and label offset that
``beitv2 convert --to hf`` needs); ``--evaluate_only true`` evaluates ``model.checkpoint`` (a segmenter file or a
transformers BeitForSemanticSegmentation folder). See docs/segmentation.md.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..checkpoint import save_model
from ..config import ConfigError, check, opt
from ..data.segmentation import (
    IterationEpochs,
    SegmentationDataConfig,
    SegmentationSamples,
    build_segmentation_source,
    class_names,
    collate_segmentation,
)
from ..data.segmentation_transforms import (
    SegmentationAugConfig,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    norm_stats,
)
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
from ..engine.precision import autocast, resolve_precision
from ..eval.metrics import write_metrics
from ..eval.normalization import resolve_normalize
from ..eval.segmentation import save_prediction_figure, write_table
from ..eval.segmentation_training import (
    SegmentationInference,
    SegmentationModelConfig,
    SegmentationTask,
    build_segmenter,
)
from ..models.segmenter import convert_sync_batchnorm, layer_id_for_segmenter
from ._training import configure_parser, quiet_other_ranks, resolve_config

HELP = "semantic segmentation with UperNet on a BEiT backbone (official ADE20K recipe)"
DESCRIPTION = __doc__

log = logging.getLogger("beitv2.segment")


@dataclass
class SegmentationScheduleConfig:
    """Iteration-based schedule (``--schedule.*``): train.epochs is derived from these."""

    iters: int = opt(160000, "optimizer steps in total (official 160k)")
    eval_every_iters: int = opt(16000, "evaluate (and checkpoint) every N steps; 0 = only at the end")

    def validate(self, prefix: str = "schedule.") -> None:
        check(self.iters >= 1, prefix + "iters", "must be >= 1")
        check(self.eval_every_iters >= 0, prefix + "eval_every_iters", "must be >= 0")
        check(self.eval_every_iters == 0 or self.iters % self.eval_every_iters == 0, prefix + "eval_every_iters",
              f"must divide schedule.iters ({self.iters})")


@dataclass
class SegmentationEvalConfig:
    """Inference for evaluation (``--eval.*``)."""

    mode: Literal["slide", "whole"] = opt("slide", "sliding windows (official) or the whole image resized to the "
                                                   "model's input size")
    window: tuple[int, ...] = opt((), "sliding window (empty = model.img_size, official 512)")
    stride: tuple[int, ...] = opt((341,), "sliding stride, one value or H W (official 341)")
    figure_samples: int = opt(4, "validation images drawn in predictions.png")

    def validate(self, prefix: str = "eval.") -> None:
        check(len(self.window) in (0, 1, 2) and all(int(v) > 0 for v in self.window), prefix + "window",
              "empty, one or two positive values")
        check(len(self.stride) in (1, 2) and all(int(v) > 0 for v in self.stride), prefix + "stride",
              "one or two positive values")
        check(self.figure_samples >= 0, prefix + "figure_samples", "must be >= 0")


def segmentation_optim_defaults() -> OptimConfig:
    return OptimConfig(lr=5e-5, min_lr=0.0, weight_decay=0.05, warmup_steps=1500, warmup_epochs=0.0,
                       layer_decay=0.75, schedule="poly", poly_power=1.0, warmup_ratio=1e-6)


def segmentation_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/segment", batch_size=16, epochs=1)


def segmentation_data_defaults() -> SegmentationDataConfig:
    return SegmentationDataConfig()


@dataclass
class SegmentationConfig:
    model: SegmentationModelConfig = field(default_factory=SegmentationModelConfig, metadata={"help": "model"})
    data: SegmentationDataConfig = field(default_factory=segmentation_data_defaults,
                                         metadata={"help": "labelled images"})
    aug: SegmentationAugConfig = field(default_factory=SegmentationAugConfig, metadata={"help": "augmentation"})
    schedule: SegmentationScheduleConfig = field(default_factory=SegmentationScheduleConfig,
                                                 metadata={"help": "schedule"})
    eval: SegmentationEvalConfig = field(default_factory=SegmentationEvalConfig, metadata={"help": "evaluation"})
    optim: OptimConfig = field(default_factory=segmentation_optim_defaults, metadata={"help": "optimizer"})
    train: TrainConfig = field(default_factory=segmentation_train_defaults, metadata={"help": "loop"})
    evaluate_only: bool = opt(False, "evaluate model.checkpoint (a segmenter file or a transformers folder) "
                                     "on the validation split and stop")

    def validate(self, prefix: str = "") -> None:
        if self.evaluate_only:
            check(not self.model.random_init, "model.checkpoint", "evaluate_only needs a trained segmenter")


def configure(parser: argparse.ArgumentParser) -> None:
    configure_parser(parser, SegmentationConfig)


def _pair(v: tuple[int, ...], default: tuple[int, int]) -> tuple[int, int]:
    if not v:
        return default
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def run(args: argparse.Namespace) -> int:
    return execute(resolve_config(SegmentationConfig, args))


def execute(cfg: SegmentationConfig) -> int:
    """The command on a resolved, validated config (`run` from the command line; the demo's stages directly)."""
    dist = init_distributed(cfg.train.device)
    quiet_other_ranks(dist.rank)
    try:
        return _run(cfg, dist)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        cleanup()


def _run(cfg: SegmentationConfig, dist) -> int:
    from functools import partial

    seed_everything(cfg.train.seed)  # the same head init on every rank
    classes = class_names(cfg.data)
    model, report = build_segmenter(cfg.model, len(classes))
    bcfg = model.config.backbone
    crop = bcfg.img_hw
    norm = resolve_normalize(cfg.aug.normalize, cfg.model) if cfg.aug.normalize == "auto" else cfg.aug.normalize
    inference = SegmentationInference(cfg.eval.mode, _pair(cfg.eval.window, crop), _pair(cfg.eval.stride, crop))
    val_src = build_segmentation_source(cfg.data, "val", bcfg.in_chans, cfg.train.seed)
    val_set = SegmentationSamples(val_src, SegmentationEvalTransform(cfg.aug, bcfg.in_chans, norm)) if val_src else None
    out = Path(cfg.train.output_dir)
    if model.last_tap < bcfg.depth and dist.enabled and not cfg.train.find_unused_parameters:
        # blocks after the deepest tap get no gradient, which DDP reports as an error unless told to expect it
        log.info("blocks %d..%d feed no pyramid level: DDP find_unused_parameters on", model.last_tap + 1, bcfg.depth)
        cfg.train.find_unused_parameters = True
    if dist.enabled and dist.device.type == "cuda":
        model = convert_sync_batchnorm(model)
    elif dist.enabled:
        log.warning("SyncBatchNorm needs CUDA: batch statistics stay per process on %s", dist.device.type)
    task = SegmentationTask(model, inference, cfg.eval.figure_samples if dist.is_main else 0)

    if cfg.evaluate_only:
        return _evaluate_only(cfg, task, val_set, dist, out, classes, norm, report)

    train_src = build_segmentation_source(cfg.data, "train", bcfg.in_chans, cfg.train.seed)
    transform = SegmentationTrainTransform(cfg.aug, crop, bcfg.in_chans, norm)
    samples = SegmentationSamples(train_src, transform, cfg.train.seed)
    steps_per_epoch = cfg.schedule.eval_every_iters or cfg.schedule.iters
    cfg.train.epochs = cfg.schedule.iters // steps_per_epoch
    per_step = cfg.train.batch_size * cfg.train.accum_steps * dist.world_size
    train_set = IterationEpochs(samples, steps_per_epoch * per_step, cfg.train.seed)
    if val_set is None:
        cfg.train.eval_every_epochs = 0
        log.warning("no validation split: no evaluation")
    depth = bcfg.depth
    layer_decay = partial(build_optimizer, layer_id_fn=lambda n: layer_id_for_segmenter(n, depth),
                          num_layers=depth + 2)
    trainer = Trainer(task, train_set, cfg.train, cfg.optim, dist=dist, run_config=cfg, val_set=val_set,
                      collate_fn=collate_segmentation, num_workers=cfg.data.num_workers, optimizer=layer_decay)
    result = trainer.fit()
    if result.status != "finished":
        if dist.is_main:
            log.info("%s at step %d; resume from %s", result.status, result.global_step, result.checkpoint)
        return result.exit_code
    if val_set is not None and (task.last_eval is None or task.last_eval["step"] + 1 != result.global_step):
        trainer.evaluate()
    if dist.is_main:
        _write_outputs(out, task, classes, norm, report, result.global_step, bcfg.in_chans,
                       reduce_zero_label=_reduces_zero_label(cfg))
    return 0


def _reduces_zero_label(cfg: SegmentationConfig) -> bool:
    return cfg.data.kind == "ade20k" or (cfg.data.kind == "folder" and cfg.data.reduce_zero_label)


def _evaluate_only(cfg: SegmentationConfig, task, val_set, dist, out: Path, classes, norm, report) -> int:
    import torch

    if val_set is None:
        raise ConfigError("data.val_path: evaluate_only needs a validation split")
    from torch.utils.data import DataLoader, Subset

    task.to(dist.device)
    if dist.enabled:  # disjoint parts, every image once (as the trainer's validation pass)
        val_set = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))
    loader = DataLoader(val_set, batch_size=1, collate_fn=collate_segmentation, num_workers=cfg.data.num_workers)
    precision = resolve_precision(cfg.train.precision, dist.device)
    with torch.no_grad():
        task.evaluate(loader, dist.device, lambda: autocast(dist.device, precision))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(out, task, classes, norm, report, 0, task.model.config.backbone.in_chans, save=False,
                       reduce_zero_label=_reduces_zero_label(cfg))
    return 0


def _write_outputs(out: Path, task, classes: list[str], norm: str, report: dict, global_step: int, channels: int,
                   save: bool = True, reduce_zero_label: bool = False) -> None:
    import json

    if save:  # what an export needs travels in the model file (class names, input statistics, label offset)
        save_model(out / "model.safetensors", task.model, "segmenter", task.model.config,
                   extra={"class_names": json.dumps(classes), "normalize": norm,
                          "reduce_zero_label": json.dumps(reduce_zero_label)})
    ev = task.last_eval
    metrics = {"global_step": global_step, "classes": classes, "normalize": norm,
               "reduce_zero_label": reduce_zero_label, "model": report}
    if ev is not None:
        m = ev["metrics"]
        metrics.update({k: m[k] for k in ("mIoU", "mAcc", "aAcc")})
        metrics["per_class"] = {c: {"IoU": iou, "Acc": acc} for c, iou, acc in zip(classes, m["IoU"], m["Acc"])}
        metrics["confusion_matrix"] = ev["confusion_matrix"].tolist()
        write_table(out / "eval_table.md", m, classes)
        if ev["samples"]:
            mean, std = norm_stats(norm, channels)
            xs, ys, ps = zip(*ev["samples"])
            save_prediction_figure(out / "predictions.png", list(xs), list(ys), list(ps), len(classes), mean, std)
        log.info("segmentation: mIoU %.2f, mAcc %.2f, aAcc %.2f; outputs in %s", m["mIoU"], m["mAcc"], m["aAcc"],
                 out)
    write_metrics(out / "metrics.json", metrics)
