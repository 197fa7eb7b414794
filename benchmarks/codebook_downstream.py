"""Does a tokenizer that uses its whole codebook give a better student? The quickstart's stages 2-4 per remedy and seed.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/codebook_downstream.py --remedies official restart \\
        restart_entropy --seeds 0 --json codebook_downstream.json

For each remedy (the quantizer options of ``benchmarks/codebook_usage.py``'s ``REMEDIES``) and seed it runs what
``beitv2 quickstart`` (the full plan) runs after its teacher, with the quickstart's own configs: ``train-tokenizer``
(two epochs on the 60,000 training images, 256 codes), ``pretrain`` (BEiT v2 MIM, three epochs), then ``linprobe``
and ``knn`` on the pre-trained backbone (5,000 training images, the 10,000 test images). It prints the tokenizer's
codebook use and teacher cosine on its validation images, and the student's probe accuracies.

All runs share one teacher: the quickstart's CNN stand-in, trained once into ``--work/teacher`` (or ``--teacher PATH``,
e.g. a quickstart run's ``teacher/model.safetensors``). The seed changes the training randomness (initialisation,
augmentation, masks, order); the data subsets stay those of seed 0, so the spread is the method's, not the subsets'.
Each stage's config is written to ``<run>/configs/<command>.yaml`` and reruns with ``beitv2 <command> --config``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from beitv2.data import FASHION_MNIST_ROOT
from beitv2.demo.baselines import read_json, row_scores
from beitv2.demo.configs import knn_config, linprobe_config, pretrain_config, tokenizer_config
from beitv2.demo.plan import CNN_CHANNELS, FULL, Plan
from beitv2.demo.stages import run_command, train_cnn_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codebook_usage import REMEDIES  # noqa: E402  (one list of remedies for both benchmarks)

DATA_SEED = 0


def with_seed(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """A stage's config, built with the data seed, with its training seed changed (the data subsets kept)."""
    cfg["run" if "run" in cfg else "train"]["seed"] = seed
    return cfg


def run_one(plan: Plan, root: str, teacher: dict[str, Any], remedy: str, seed: int, work: Path) -> dict[str, Any]:
    out = work / f"{remedy}_seed{seed}"
    cfg_dir = out / "configs"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tok = with_seed(tokenizer_config(plan, root, teacher, CNN_CHANNELS[-1], out / "tokenizer", DATA_SEED, False), seed)
    tok["tokenizer"]["vqkd"]["quantizer"].update({"use_whole_codebook": False, **REMEDIES[remedy]})
    run_command("train-tokenizer", tok, cfg_dir)
    timings["tokenizer"] = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if r["type"] == "val"][-1]
    epoch = [r for r in lines if r["type"] == "epoch"][-1]

    t0 = time.perf_counter()
    mim = with_seed(pretrain_config(plan, root, out / "tokenizer" / "model.safetensors", out / "pretrain", DATA_SEED,
                                    False), seed)
    run_command("pretrain", mim, cfg_dir)
    timings["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ckpt, cache = out / "pretrain" / "model.safetensors", out / "eval" / "features"
    lp_dir, knn_dir = out / "eval" / "linprobe", out / "eval" / "knn"
    run_command("linprobe", with_seed(linprobe_config(plan, root, ckpt, lp_dir, cache, DATA_SEED, False), seed),
                cfg_dir)
    run_command("knn", with_seed(knn_config(plan, root, ckpt, knn_dir, cache, DATA_SEED, False), seed), cfg_dir)
    timings["eval"] = time.perf_counter() - t0
    scores = row_scores(plan, read_json(lp_dir / "metrics.json"), read_json(knn_dir / "metrics.json"), str(ckpt))
    return {"remedy": remedy, "seed": seed, "quantizer": REMEDIES[remedy], "codes": plan.tok_codes,
            "val_codes_used": val["codebook_codes_used"], "val_usage": val["codebook_usage"],
            "val_perplexity": val["codebook_perplexity"], "val_teacher_cos": val["teacher_cos"],
            "train_codes_used": epoch["codebook_codes_used"], "restarted": epoch.get("codebook_restarted", 0),
            "linprobe_acc1": scores["linprobe_acc1"], "knn_acc1": scores["knn_acc1"],
            "wall_s": {k: round(v, 1) for k, v in timings.items()}}


def row(r: dict[str, Any]) -> str:
    return (f"| {r['remedy']} | {r['seed']} | {r['val_codes_used']} ({100 * r['val_usage']:.1f}%) | "
            f"{r['val_perplexity']:.1f} | {r['val_teacher_cos']:.4f} | {r['linprobe_acc1']:.2f} | "
            f"{r['knn_acc1']:.2f} | {sum(r['wall_s'].values()):.0f} |")


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread (min-max) per remedy over its seeds."""
    out = []
    for remedy in dict.fromkeys(r["remedy"] for r in rows):
        rs = [r for r in rows if r["remedy"] == remedy]
        parts = []
        for key, fmt in (("val_usage", "{:.1%}"), ("val_teacher_cos", "{:.4f}"), ("linprobe_acc1", "{:.2f}"),
                         ("knn_acc1", "{:.2f}")):
            vals = [r[key] for r in rs]
            spread = f" ({fmt.format(min(vals))}-{fmt.format(max(vals))})" if len(vals) > 1 else ""
            parts.append(f"{key} {fmt.format(statistics.mean(vals))}{spread}")
        out.append(f"{remedy}, {len(rs)} seed(s): " + ", ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=FASHION_MNIST_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--remedies", nargs="+", default=["official", "restart", "restart_entropy"],
                   choices=sorted(REMEDIES), help="quantizer options of the tokenizer (codebook_usage.REMEDIES)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of each remedy")
    p.add_argument("--teacher", default="", help="a beitv2 teacher model file (default: train the quickstart's CNN "
                                                 "stand-in once into --work/teacher)")
    p.add_argument("--work", default="runs/codebook_downstream", help="folder of the teacher and the runs")
    p.add_argument("--json", default="", help="also write the rows to this JSON file (rewritten after every run)")
    args = p.parse_args(argv)
    if not Path(args.data_path).is_dir():
        print(f"error: --data-path: no such folder {args.data_path}", file=sys.stderr)
        return 2
    work, plan = Path(args.work), replace(FULL, num_workers=0)
    teacher_path = Path(args.teacher) if args.teacher else work / "teacher" / "model.safetensors"
    if args.teacher and not teacher_path.is_file():
        print(f"error: --teacher: no such file {teacher_path}", file=sys.stderr)
        return 2
    if not teacher_path.is_file():
        torch.manual_seed(DATA_SEED)
        train_cnn_teacher(plan, args.data_path, teacher_path.parent, work / "configs", DATA_SEED, False)
    teacher = {"kind": "beitv2", "name_or_path": str(teacher_path), "feature_norm": "layernorm"}
    rows: list[dict[str, Any]] = []
    print("| remedy | seed | codes used (val) | perplexity | teacher cos | linear probe % | k-NN (k=20) % | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for remedy in args.remedies:
        for seed in args.seeds:
            rows.append(run_one(plan, args.data_path, teacher, remedy, seed, work))
            print(row(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
