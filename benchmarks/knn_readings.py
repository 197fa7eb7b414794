"""The k-NN of a quickstart run's backbones under other readings of their tokens: is the student's k-NN gap to its
teacher a matter of how the features are read?

    python benchmarks/knn_readings.py --run demo_out

reads the run's pre-trained ViT (every block, after the final norm), its CNN teacher (the last feature map) and the
raw pixels with the quickstart's k-NN (the plan's training / test images, k = 20, T = 0.07), each as it is and
standardised (every dimension z-scored with the training set's mean and std before the cosine):

* ``cls``: the CLS token (the teacher: its map's mean);
* ``cls+grid3`` (the plan's reading), ``cls+grid4``: CLS and the patch tokens average-pooled to a g x g grid (the
  teacher: the map's mean and the map pooled the same way);
* ``cls+all``: CLS and every patch token in place (the teacher: its mean and the whole map).

The ``cls+grid3`` figure of the last block is the report's k-NN row (the same features and vote). Figures:
docs/quickstart.md, "A larger student, and every reading of the k-NN".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from beitv2.checkpoint import load_model
from beitv2.data.fmnist import fashion_mnist_tensors
from beitv2.data.transforms import resolve_norm
from beitv2.demo import PLANS
from beitv2.engine.precision import autocast, resolve_precision
from beitv2.eval.backbones import ModelSource, load_backbone
from beitv2.eval.knn import knn_scores
from beitv2.models.backbone import BEiTViT

READINGS = ("cls", "cls+grid3", "cls+grid4", "cls+all")


def read(first: torch.Tensor, fmap: torch.Tensor, reading: str) -> torch.Tensor:
    """CLS (or a map's mean) [B, D] and a feature map [B, D, H, W] -> the reading's features [B, F]."""
    if reading == "cls":
        return first
    rest = fmap.flatten(1) if reading == "cls+all" else F.adaptive_avg_pool2d(fmap, int(reading[-1])).flatten(1)
    return torch.cat([first, rest], 1)


def normalised(images01: torch.Tensor) -> torch.Tensor:
    """The quickstart's model-view normalisation (ImageNet statistics, one channel)."""
    (mean,), (std,) = resolve_norm("imagenet", 1)
    return (images01 - mean) / std


def vit_tokens(model: BEiTViT, images01: torch.Tensor, batch: int = 1000) -> dict[int, torch.Tensor]:
    """{block: [B, 1+N, D] tokens after the final norm}, read as the quickstart's feature pass reads them (ImageNet
    normalisation, bf16 autocast where the CPU has it)."""
    model.eval()
    device = torch.device("cpu")
    out: dict[int, list[torch.Tensor]] = {b: [] for b in range(1, model.depth + 1)}
    with torch.no_grad(), autocast(device, resolve_precision("bf16", device)):
        for i in range(0, len(images01), batch):
            last, saved = model.forward_features(normalised(images01[i:i + batch]),
                                                 return_layers=list(range(1, model.depth)))
            saved[model.depth] = last
            for b in out:
                out[b].append(model.norm(saved[b]).float())
    return {b: torch.cat(v) for b, v in out.items()}


def vit_readings(tokens: torch.Tensor, grid: tuple[int, int], reading: str) -> torch.Tensor:
    patches = tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, *grid)
    return read(tokens[:, 0], patches, reading)


def knn_pair(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, k: int = 20
             ) -> tuple[float, float]:
    """(k-NN top-1, standardised k-NN top-1) in %."""
    def score(a: torch.Tensor, b: torch.Tensor) -> float:
        votes = knn_scores(a, y_train, b, int(max(y_train.max(), y_test.max())) + 1, (k,), 0.07, 4096)[k]
        return 100.0 * (votes.argmax(1) == y_test).float().mean().item()

    mu, sd = train.mean(0), train.std(0) + 1e-6
    return score(train, test), score((train - mu) / sd, (test - mu) / sd)


def measure(run: Path, plan_name: str, root: str, seed: int) -> list[dict]:
    plan = PLANS[plan_name]
    x_tr, y_tr, _ = fashion_mnist_tensors(root, train=True, subset=plan.eval_train_subset, seed=seed)
    x_te, y_te, _ = fashion_mnist_tensors(root, train=False, subset=plan.test_subset, seed=seed)
    rows = []

    def add(backbone: str, block: int | None, feats: Callable[[str, bool], torch.Tensor], readings=READINGS):
        for r in readings:
            knn, std = knn_pair(feats(r, True), y_tr, feats(r, False), y_te)
            rows.append({"backbone": backbone, "block": block, "reading": r, "knn_acc1": knn, "knn_std_acc1": std})

    student, _ = load_backbone(ModelSource(checkpoint=str(run / "pretrain" / "model.safetensors")))
    grid = tuple(student.grid_size)
    tr, te = vit_tokens(student, x_tr), vit_tokens(student, x_te)
    for b in sorted(tr):
        add("BEiT v2", b, lambda r, is_tr, b=b: vit_readings((tr if is_tr else te)[b], grid, r))
    teacher = run / "teacher" / "model.safetensors"
    if teacher.is_file():
        net = load_model(teacher)[0].eval()
        with torch.no_grad():
            maps = {True: net.forward_features(x_tr), False: net.forward_features(x_te)}
        add("teacher", None, lambda r, is_tr: read(maps[is_tr].mean((2, 3)), maps[is_tr], r))
    pixels = {True: normalised(x_tr).flatten(1), False: normalised(x_te).flatten(1)}
    add("raw pixels", None, lambda r, is_tr: pixels[is_tr], readings=("pixels",))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--run", required=True, help="a quickstart's output folder (pretrain/, teacher/, configs/)")
    ap.add_argument("--plan", choices=tuple(PLANS), default="full", help="the plan the run used (its image subsets)")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (the same training subset)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = run / "configs" / "knn.beitv2.yaml"
    if not (run / "pretrain" / "model.safetensors").is_file() or not cfg.is_file():
        print(f"error: --run: {run} is not a finished quickstart folder (no pretrain/model.safetensors or "
              "configs/knn.beitv2.yaml)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    root = yaml.safe_load(cfg.read_text())["data"]["path"]
    rows = measure(run, args.plan, root, args.seed)
    print("| backbone | block | reading | k-NN, k=20 (%) | standardised (%) |\n|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['block'] or ''} | {r['reading']} | {r['knn_acc1']:.2f} | "
              f"{r['knn_std_acc1']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "plan": args.plan, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
