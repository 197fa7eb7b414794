"""How much of the VQ-KD codebook a tokenizer trained on Fashion-MNIST uses, per data size, codebook size and remedy.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/codebook_usage.py --steps 300 --sizes 60000 2000 \\
        --codes 256 1024 --remedies official restart restart_entropy --json codebook_usage.json

Each cell trains the quickstart's tokenizer (ViT encoder width 64, depth 2, 4 heads, patch 4 on 28 px; one decoder
block; AdamW lr 2e-3, betas (0.9, 0.99), weight decay 1e-4, cosine to 1e-5 after a 5 % warm-up; crops of scale
0.5-1 with flips; bf16 where the CPU has it) for a fixed number of optimizer steps on the first ``size`` training
images of a seeded subset, against one frozen teacher shared by all cells, then reads on the validation images (the
first 2,000 test images): codes used, perplexity and the cosine between the decoded and the teacher's features.

The teacher is the quickstart's stand-in (no CLIP weights offline): a small timm CNN trained on 38,400 labels for one
epoch, built here from the library (``--teacher PATH`` reuses any beitv2 model file with a 7 x 7 feature grid instead,
e.g. a quickstart run's ``teacher/model.safetensors``; a trained one is kept in ``--work`` and reused).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from beitv2.config import from_dict
from beitv2.data import (
    FASHION_MNIST_ROOT,
    DataConfig,
    EvalTransform,
    TokenizerTrainDataset,
    TokenizerTrainTransform,
    build_dataset,
    collate_skip_bad,
)
from beitv2.data.samples import for_loader
from beitv2.engine import OptimConfig, TrainConfig, Trainer, init_distributed, seed_everything
from beitv2.models.quantizer import WHOLE_CODEBOOK, QuantizerConfig
from beitv2.models.vqkd import VQKD, VQKDConfig, vqkd_encoder_config
from beitv2.tasks import TokenizerTask
from beitv2.teachers import TeacherConfig, build_teacher

# Quantizer options of each remedy, over the official recipe (k-means init, decay 0.99, no restart).
REMEDIES: dict[str, dict[str, Any]] = {
    "official": {},
    "restart": {"restart_below": 0.05},
    "restart_decay0.9": {"restart_below": 0.05, "decay": 0.9},
    "entropy": {"entropy_weight": 0.02},
    "restart_entropy": dict(WHOLE_CODEBOOK),  # what QuantizerConfig.use_whole_codebook turns on
    "dim8": {"code_dim": 8},
    "restart_dim8": {"restart_below": 0.05, "code_dim": 8},
}
CNN_CHANNELS = (32, 48, 64, 96)  # the quickstart's CNN stand-in: timm resnet10t at quarter width, output stride 8
VAL_IMAGES = 2000
SEED = 0


class Repeated(torch.utils.data.Dataset):
    """``length`` samples cycling over ``base``: one epoch of the trainer is then exactly the step budget, whatever the
    data size, and each repeat of an image gets its own augmentation (the sample index differs)."""

    def __init__(self, base: Any, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base[index % len(self.base)]


def data_config(root: str, subset: int) -> DataConfig:
    return DataConfig(kind="fmnist", path=root, channels=1, subset=subset, val_subset=VAL_IMAGES, num_workers=0,
                      seed=SEED)


def train_teacher(root: str, out: Path, labels: int, epochs: int) -> Path:
    """The quickstart's CNN stand-in teacher, trained supervised (label smoothing 0.1, flips, AdamW lr 3e-3)."""
    from torch import nn
    from torchvision.transforms import v2

    from beitv2.data.samples import TransformDataset
    from beitv2.data.transforms import resolve_norm
    from beitv2.eval.finetune import ClassificationTask
    from beitv2.models.timm_net import TimmNet, TimmNetConfig

    mean, std = resolve_norm("imagenet", 1)
    net = TimmNet(TimmNetConfig(name="resnet10t", num_classes=10, in_chans=1, img_size=56, mean=tuple(mean),
                                std=tuple(std), model_kwargs={"channels": list(CNN_CHANNELS), "output_stride": 8}))
    flip = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    plain = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    data = replace(data_config(root, labels), val_subset=VAL_IMAGES)
    train_set = TransformDataset(build_dataset(data, "train"), flip, seed=SEED)
    val_set = TransformDataset(build_dataset(data, "val"), plain, seed=SEED)
    dist = init_distributed("cpu")
    task = ClassificationTask(net, nn.CrossEntropyLoss(label_smoothing=0.1), out_dir=out, is_main=True)
    train = TrainConfig(output_dir=str(out), epochs=epochs, batch_size=128, precision="bf16", device="cpu",
                        seed=SEED, progress=False, tensorboard=False, keep_last=1, resume="none",
                        eval_every_epochs=epochs)
    optim = OptimConfig(lr=3e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.08)
    result = Trainer(task, for_loader(train_set), train, optim, dist=dist, val_set=for_loader(val_set),
                     collate_fn=collate_skip_bad, num_workers=0).fit()
    if result.exit_code != 0:
        raise SystemExit(f"error: the teacher's training ended with status {result.status}")
    return out / "model.safetensors"


def tokenizer_config(codes: int, remedy: str, teacher_dim: int) -> VQKDConfig:
    encoder = vqkd_encoder_config(img_size=(28,), patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                                  patch_embed_init="trunc_normal")
    quantizer = QuantizerConfig(**{"num_codes": codes, "code_dim": 32, "kmeans_init": True, **REMEDIES[remedy]})
    return VQKDConfig(encoder=encoder, decoder_depth=1, teacher_dim=teacher_dim, quantizer=quantizer)


def run_cell(root: str, teacher: TeacherConfig, teacher_dim: int, size: int, codes: int, remedy: str, steps: int,
             batch: int, work: Path) -> dict[str, Any]:
    """Train one tokenizer for ``steps`` steps and read its codebook on the validation images."""
    seed_everything(SEED)
    vq = tokenizer_config(codes, remedy, teacher_dim)
    data = data_config(root, size)
    train_tf = TokenizerTrainTransform((28, 28), 0.5, 0.0, 0.5, "bicubic", jitter_after_crop=True)
    train_set = TokenizerTrainDataset(Repeated(build_dataset(data, "train"), steps * batch), train_tf, seed=SEED)
    eval_tf = EvalTransform((28, 28), None, "bicubic", normalize="none", channels=1)
    val_set = for_loader(TokenizerTrainDataset(build_dataset(data, "val"), eval_tf, seed=SEED))
    out = work / f"n{size}_k{codes}_{remedy}"
    train = TrainConfig(output_dir=str(out), epochs=1, batch_size=batch, precision="bf16", device="cpu", seed=SEED,
                        progress=False, tensorboard=False, keep_last=1, resume="none", log_every_steps=50)
    optim = OptimConfig(lr=2e-3, lr_reference_batch=0, min_lr=1e-5, weight_decay=1e-4, warmup_steps=max(1, steps // 20),
                        betas=(0.9, 0.99), official_no_decay=True)
    task = TokenizerTask(VQKD(vq), build_teacher(teacher, vq.encoder.grid_size))
    t0 = time.perf_counter()
    result = Trainer(task, for_loader(train_set), train, optim, dist=init_distributed("cpu"), val_set=val_set,
                     collate_fn=collate_skip_bad, num_workers=0).fit()
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"error: cell n={size} K={codes} {remedy} ended with status {result.status}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if r["type"] == "val"][-1]
    train_epoch = [r for r in lines if r["type"] == "epoch"][-1]
    return {"images": size, "codes": codes, "remedy": remedy, "steps": result.global_step, "batch": batch,
            "quantizer": REMEDIES[remedy], "val_codes_used": val["codebook_codes_used"],
            "val_usage": val["codebook_usage"], "val_perplexity": val["codebook_perplexity"],
            "val_teacher_cos": val["teacher_cos"], "train_codes_used": train_epoch["codebook_codes_used"],
            "restarted": train_epoch.get("codebook_restarted", 0), "wall_s": wall}


def row(r: dict[str, Any]) -> str:
    used = f"{r['val_codes_used']:,} ({100 * r['val_usage']:.1f}%)"
    return (f"| {r['images']:,} | {r['codes']:,} | {r['remedy']} | {used} | {r['val_perplexity']:.1f} | "
            f"{r['val_teacher_cos']:.4f} | {r['restarted']:,} | {r['wall_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=FASHION_MNIST_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 60000], help="training images per cell")
    p.add_argument("--codes", type=int, nargs="+", default=[256, 1024, 8192], help="codebook sizes")
    p.add_argument("--remedies", nargs="+", default=["official", "restart", "restart_entropy"],
                   choices=sorted(REMEDIES), help="quantizer options per cell (see REMEDIES)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per cell (the same for every data size)")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--teacher", default="", help="a beitv2 teacher model file (default: train the CNN stand-in once "
                                                 "into --work/teacher)")
    p.add_argument("--teacher-labels", type=int, default=38400, help="labelled images of the stand-in teacher")
    p.add_argument("--work", default="runs/codebook_usage", help="folder of the teacher and the cells' runs")
    p.add_argument("--json", default="", help="also write the rows to this JSON file (rewritten after every cell)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        print("error: --steps and --batch must be >= 1", file=sys.stderr)
        return 2
    if not Path(args.data_path).is_dir():
        print(f"error: --data-path: no such folder {args.data_path}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    teacher_path = Path(args.teacher) if args.teacher else work / "teacher" / "model.safetensors"
    if args.teacher and not teacher_path.is_file():
        print(f"error: --teacher: no such file {teacher_path}", file=sys.stderr)
        return 2
    if not teacher_path.is_file():
        t0 = time.perf_counter()
        train_teacher(args.data_path, teacher_path.parent, args.teacher_labels, 1)
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s: {teacher_path}", flush=True)
    teacher = from_dict(TeacherConfig, {"kind": "beitv2", "name_or_path": str(teacher_path),
                                        "feature_norm": "layernorm"})
    teacher_dim = build_teacher(teacher, (7, 7)).feature_dim
    rows: list[dict[str, Any]] = []
    print(f"{args.steps} steps of {args.batch} images per cell; validation: the first {VAL_IMAGES:,} test images")
    print("| images | codes | remedy | codes used (val) | perplexity | teacher cos | restarted | wall s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for size in args.sizes:
        for codes in args.codes:
            for remedy in args.remedies:
                r = run_cell(args.data_path, teacher, teacher_dim, size, codes, remedy, args.steps, args.batch, work)
                rows.append(r)
                print(row(r), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(math.isfinite(r["val_teacher_cos"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
