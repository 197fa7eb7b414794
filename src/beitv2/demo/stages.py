"""The quickstart's stages. Each builds a command's typed config (the mapping of `.configs`, also written to
``configs/<stage>.yaml`` for the user) and calls that command's ``execute`` in this process."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchvision.transforms import v2

from ..checkpoint import read_metadata, save_model
from ..commands import finetune, knn, linprobe, pretrain, segment, train_tokenizer
from ..commands._training import config_from
from ..config import ConfigError, from_dict
from ..data import DataConfig, build_dataset, collate_skip_bad
from ..data.samples import TransformDataset, for_loader
from ..data.transforms import resolve_norm
from ..engine import OptimConfig, TrainConfig, Trainer, init_distributed
from ..eval.finetune import ClassificationTask, final_report
from ..eval.metrics import write_metrics
from ..models.backbone import BEiTViT, ViTConfig
from ..models.timm_net import TimmNet, TimmNetConfig
from ..teachers import TeacherConfig, build_teacher
from .baselines import cnn_teacher_scores, raw_pixel_baseline, read_json, row_scores
from .configs import (
    _vit,
    cnn_teacher_config,
    knn_config,
    linprobe_config,
    mim_backbone,
    segment_config,
    teacher_config,
)
from .plan import CNN_CHANNELS, NORM, Plan

log = logging.getLogger("beitv2.quickstart")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its exit status."""


# command name -> (its config class, its `execute`)
COMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "train-tokenizer": (train_tokenizer.TrainTokenizerConfig, train_tokenizer.execute),
    "pretrain": (pretrain.PretrainConfig, pretrain.execute),
    "linprobe": (linprobe.LinProbeConfig, linprobe.execute),
    "knn": (knn.KNNCommandConfig, knn.execute),
    "finetune": (finetune.FinetuneConfig, finetune.execute),
    "segment": (segment.SegmentationConfig, segment.execute),
}


def command_status(name: str, cfg: dict[str, Any], cfg_dir: Path, recipe: str | None = None) -> int:
    """Write ``cfg`` to ``cfg_dir/<name>.yaml`` (``beitv2 <command> [--preset P] --config`` reruns the stage), then
    run the command ``name`` (up to its first dot) on the typed config built from it; its exit status (2 for a
    configuration error, named on stderr as the command line names it)."""
    command = name.split(".")[0]
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cfg_class, execute = COMMANDS[command]
    try:
        return int(execute(config_from(cfg_class, cfg, recipe)) or 0)
    except ConfigError as e:
        print(f"beitv2 {command}: configuration error: {e}", file=sys.stderr)
        return 2


def run_command(name: str, cfg: dict[str, Any], cfg_dir: Path) -> None:
    """`command_status`; a failed command ends the quickstart (StageError)."""
    rc = command_status(name, cfg, cfg_dir)
    if rc != 0:
        path = cfg_dir / f"{name}.yaml"
        raise StageError(f"`beitv2 {name.split('.')[0]} --config {path}` failed with exit status {rc}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (data-loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timer:
    """Wall and CPU seconds per stage, printed as each stage ends."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, index: int, total: int):
        print(f"[quickstart] stage {index}/{total}: {name} ...", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        yield
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        self.stages[name], self.cpu[name] = dt, dc
        print(f"[quickstart] stage {index}/{total}: {name} done in {dt:.1f} s (CPU {dc:.1f} s)", flush=True)


def build_teacher_spec(args: argparse.Namespace, plan: Plan, root: str, out: Path, cfg_dir: Path, progress: bool
                       ) -> tuple[dict[str, Any], int, Path | None, str]:
    """(teacher section for train-tokenizer, feature width, beitv2 checkpoint to evaluate or None, description)."""
    if args.teacher:
        spec: dict[str, Any] = {"kind": args.teacher_kind, "name_or_path": args.teacher}
        if args.teacher_checkpoint:
            spec["checkpoint"] = args.teacher_checkpoint
        if args.teacher_kind == "hf":
            spec["local_files_only"] = False
        teacher = build_teacher(TeacherConfig(**spec), (7, 7))  # fails early, naming the field, when unusable
        dim = teacher.feature_dim
        del teacher
        path = Path(args.teacher) if args.teacher_kind == "beitv2" else None
        return spec, dim, path, f"user-given {args.teacher_kind} teacher {args.teacher}"
    tdir = out / "teacher"
    tdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if plan.teacher_arch == "cnn":
        path = train_cnn_teacher(plan, root, tdir, cfg_dir, args.seed, progress)
        desc = (f"a small CNN (timm resnet10t, widths 32-96, 56 px input, output stride 8: a 7 x 7 feature map) "
                f"trained supervised from random init on {_subset_words(plan.teacher_labels)} of the training "
                f"labels ({plan.teacher_epochs} epoch{'s' if plan.teacher_epochs > 1 else ''}), because no CLIP or "
                "DINO weights can be fetched offline; "
                "VQ-KD reads its last feature map, layer-normed per patch")
        return {"kind": "beitv2", "name_or_path": str(path), "feature_norm": "layernorm"}, CNN_CHANNELS[-1], path, desc
    # no layer scale and a full-scale head: a from-scratch ViT on a few thousand labels learns faster so
    vit_cfg = ViTConfig(**_vit(plan.teacher_vit, init_values=0.0, use_abs_pos_emb=True,
                               use_shared_rel_pos_bias=False, use_mean_pooling=True))
    init = tdir / "init.safetensors"
    save_model(init, BEiTViT(vit_cfg), "vit", vit_cfg)
    run_command("finetune.teacher", teacher_config(plan, root, init, tdir, args.seed, progress), cfg_dir)
    path = tdir / "model.safetensors"
    desc = (f"a ViT (width {plan.teacher_vit[0]}, depth {plan.teacher_vit[1]}) trained "
            f"supervised from random init on {_subset_words(plan.teacher_labels)} of the training labels, because "
            "no CLIP or DINO weights can be fetched offline")
    return {"kind": "beitv2", "name_or_path": str(path)}, plan.teacher_vit[0], path, desc


def train_cnn_teacher(plan: Plan, root: str, out: Path, cfg_dir: Path, seed: int, progress: bool) -> Path:
    """Train the CNN stand-in teacher (`beitv2.models.timm_net.TimmNet`) with the project's trainer; its config is
    ``out/config.yaml`` (the trainer writes it), not in ``cfg_dir``, whose files each rerun with one command's
    ``--config``: no command trains this teacher. Returns ``out/model.safetensors``."""
    cfg = cnn_teacher_config(plan, root, out, seed, progress)
    mean, std = resolve_norm(NORM, 1)
    net = TimmNet(from_dict(TimmNetConfig, {**cfg["net"], "mean": list(mean), "std": list(std)}))
    data = from_dict(DataConfig, cfg["data"])
    flip = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    plain = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    train_set = TransformDataset(build_dataset(data, "train"), flip, seed=seed)
    val_set = TransformDataset(build_dataset(data, "val"), plain, seed=seed)
    dist = init_distributed("cpu")
    task = ClassificationTask(net, nn.CrossEntropyLoss(label_smoothing=0.1), out_dir=out, is_main=dist.is_main)
    trainer = Trainer(task, for_loader(train_set), from_dict(TrainConfig, cfg["train"]),
                      from_dict(OptimConfig, cfg["optim"]), dist=dist, run_config=cfg, val_set=for_loader(val_set),
                      collate_fn=collate_skip_bad, num_workers=plan.num_workers)
    result = trainer.fit()
    if result.exit_code != 0:
        raise StageError(f"the CNN teacher's training ended with status {result.status}")
    write_metrics(out / "metrics.json", {"global_step": result.global_step, "num_images": len(train_set),
                                         **final_report(task, 10)})
    return out / "model.safetensors"


def _subset_words(subset: float) -> str:
    if subset <= 0:
        return "all"
    return f"{100 * subset:.0f}%" if subset < 1 else f"{int(subset)} images"


def evaluate(name: str, checkpoint: Path, plan: Plan, root: str, out: Path, cfg_dir: Path, seed: int,
             progress: bool) -> dict[str, Any]:
    """Linear probe and k-NN of one backbone; features are extracted once (shared cache)."""
    cache = out / "eval" / "features"
    lp_dir, knn_dir = out / "eval" / name / "linprobe", out / "eval" / name / "knn"
    run_command(f"linprobe.{name}", linprobe_config(plan, root, checkpoint, lp_dir, cache, seed, progress), cfg_dir)
    run_command(f"knn.{name}", knn_config(plan, root, checkpoint, knn_dir, cache, seed, progress), cfg_dir)
    lp, knn = read_json(lp_dir / "metrics.json"), read_json(knn_dir / "metrics.json")
    return row_scores(plan, lp, knn, str(checkpoint))


def file_kind(path: Path) -> str:
    return read_metadata(path).get("kind", "")


def evaluate_all(args: argparse.Namespace, plan: Plan, root: str, out: Path, cfg_dir: Path, mim_dir: Path,
                 teacher_ckpt: Path | None, progress: bool) -> dict[str, dict[str, Any]]:
    rdir = out / "random_init"
    rdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + 1)
    cfg = from_dict(ViTConfig, mim_backbone(plan))
    random_ckpt = rdir / "model.safetensors"
    save_model(random_ckpt, BEiTViT(cfg), "vit", cfg)  # same architecture as the pre-trained backbone, untrained
    results = {"BEiT v2 (pre-trained)": evaluate("beitv2", mim_dir / "model.safetensors", plan, root, out, cfg_dir,
                                                 args.seed, progress),
               "random init (same ViT)": evaluate("random_init", random_ckpt, plan, root, out, cfg_dir, args.seed,
                                                  progress)}
    results["raw pixels"] = raw_pixel_baseline(plan, root, out, args.seed, progress)
    if teacher_ckpt is not None and file_kind(teacher_ckpt) == "timm":
        results["teacher"] = cnn_teacher_scores(plan, root, teacher_ckpt, out, args.seed, progress)
    elif teacher_ckpt is not None:
        results["teacher"] = evaluate("teacher", teacher_ckpt, plan, root, out, cfg_dir, args.seed, progress)
    else:
        results["teacher"] = {"linprobe_acc1": None, "knn_acc1": None,
                              "note": "external teachers are not evaluated by the quickstart"}
    return results


def segmentation_stage(out: Path, root: str, backbones: dict[str, Path], cfg_dir: Path, seed: int, fast: bool,
                       progress: bool) -> dict[str, dict]:
    """``--segment``: the same segmentation schedule on each backbone (a failed run is a row with its exit status,
    not the end of the quickstart); a section in report.md."""
    segmentation_dir = out / "segmentation"
    shutil.rmtree(segmentation_dir, ignore_errors=True)
    results: dict[str, dict] = {}
    for i, (name, ckpt) in enumerate(backbones.items()):
        run_dir = segmentation_dir / f"run{i}"
        cfg = segment_config(ckpt, root, run_dir, seed, fast, progress)
        recipe = cfg.pop("recipe")
        rc = command_status(f"segment.run{i}", cfg, cfg_dir, recipe)
        m = read_json(run_dir / "metrics.json") if rc == 0 else {}
        results[name] = {k: m.get(k) for k in ("mIoU", "mAcc", "aAcc")} | {"run": str(run_dir), "exit_code": rc}
    iters = segment_config(Path("."), root, segmentation_dir, seed, fast, progress)["schedule"]["iters"]
    lines = ["", "## Semantic segmentation (`--segment`)", "",
             f"UperNet fine-tuned for {iters} iterations (batch 8) on the Fashion-MNIST composition (56 x 56 canvases "
             "of 2-4 items, 11 classes), same schedule for every backbone (`beitv2 segment --preset seg_fmnist_cpu`, "
             "configs in configs/segment.run*.yaml); test compositions:", "",
             "| backbone | mIoU | mAcc | aAcc |", "|---|---:|---:|---:|"]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | {f(r['mIoU'])} | {f(r['mAcc'])} | {f(r['aAcc'])} |")
    with open(out / "report.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    return results
