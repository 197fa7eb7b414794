"""The command-level part of benchmarks/gpu_check.sh: real CLI runs on a generated JPEG folder, and the sync check.

    python benchmarks/gpu_check.py OUT_DIR [--size tiny|base] [--only runs|sync]

* ``runs``: `train-tokenizer` (stopped after 2 steps, then resumed to the end), `pretrain` (the same) with that
  tokenizer, `finetune` and `knn` of the pre-trained model, each timed; figures and the commands' metrics files under
  OUT_DIR. ``--size base`` uses ViT-B/16 at 224 px (a GPU), ``tiny`` 32 px models (any machine).
* ``sync``: `beitv2.engine.Trainer` pre-training steps with ``torch.cuda.set_sync_debug_mode("error")`` around the
  steady-state steps (every step that is not a check point: not the first, not a log / save step, not the epoch's
  last), so any host sync there raises. The images travel as uint8 with the data set's ``batch_spec``, as
  `MIMDataset` ships them, so the trainer's conversion to float on the device is watched too. CUDA only; on a CPU
  machine it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SIZES = {
    "tiny": {"img": 32, "teacher": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
             "vit": {"img_size": [32], "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
             "codes": 64, "code_dim": 8, "mask": 16, "min_block": 4, "batch": 8, "images": 64},
    "base": {"img": 224, "teacher": {}, "vit": {"img_size": [224], "patch_size": 16},
             "codes": 8192, "code_dim": 32, "mask": 75, "min_block": 16, "batch": 64, "images": 512},
}


def make_jpegs(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(size * rng.uniform(1.0, 1.6)), int(size * rng.uniform(1.0, 1.6))
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[..., i % 2] //= 2  # two classes a k-NN can tell apart
        Image.fromarray(arr).save(root / f"class{i % 2}" / f"{i}.jpg", quality=90)
    return root


def run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "beitv2.cli", *args]


def runs(out: Path, size: str) -> dict:
    z = SIZES[size]
    data = make_jpegs(out / "jpegs" / "train", z["images"], z["img"])
    val = make_jpegs(out / "jpegs" / "val", z["images"] // 4, z["img"])
    train = {"epochs": 1, "batch_size": z["batch"], "log_every_steps": 2, "progress": False, "tensorboard": False}
    tok_cfg = {"tokenizer": {"type": "vqkd", "vqkd": {"encoder": dict(z["vit"]), "decoder_depth": 1,
                                                    "quantizer": {"num_codes": z["codes"], "code_dim": z["code_dim"]},
                                                    "teacher_dim": z["teacher"].get("embed_dim", 768)}},
               "teacher": {"kind": "timm", "name_or_path": "vit_base_patch16_224", "model_kwargs": z["teacher"],
                           "random_init": True},  # no model hub here: FLOPs and plumbing, not quality
               "data": {"kind": "folder", "path": str(data), "val_path": str(val)},
               "optim": {"lr_reference_batch": 0, "warmup_epochs": 0.5},
               "train": {**train, "output_dir": str(out / "tok")}}
    (out / "tok.yaml").write_text(yaml.safe_dump(tok_cfg))
    log = out / "runs.log"
    t: dict[str, float] = {}
    t["train_tokenizer_stop_s"] = run(cli("train-tokenizer", "--config", str(out / "tok.yaml"),
                                          "--train.stop_after_steps", "2"), log)
    t["train_tokenizer_resume_s"] = run(cli("train-tokenizer", "--config", str(out / "tok.yaml")), log)
    mim = {"backbone": {**z["vit"], "init_values": 0.1}, "vocab_size": z["codes"], "early_layers": 1,
           "head_layers": 1} if size == "tiny" else {"vocab_size": z["codes"]}
    pt_cfg = {"model": mim, "tokenizer": {"checkpoint": str(out / "tok" / "model.safetensors")},
              "data": {"kind": "folder", "path": str(data)},
              "mask": {"num_masking_patches": z["mask"], "min_num_patches": z["min_block"]},
              "optim": {"warmup_epochs": 0.5}, "train": {**train, "output_dir": str(out / "pt")}}
    (out / "pt.yaml").write_text(yaml.safe_dump(pt_cfg))
    t["pretrain_stop_s"] = run(cli("pretrain", "--config", str(out / "pt.yaml"), "--train.stop_after_steps", "2"), log)
    t["pretrain_resume_s"] = run(cli("pretrain", "--config", str(out / "pt.yaml")), log)
    ckpt = str(out / "pt" / "model.safetensors")
    t["finetune_s"] = run(cli("finetune", "--model.checkpoint", ckpt, "--data.path", str(data), "--data.val_path",
                              str(val), "--train.epochs", "1", "--train.batch_size", str(z["batch"]),
                              "--optim.warmup_epochs", "0", "--train.output_dir", str(out / "ft"),
                              "--train.progress", "false", "--train.tensorboard", "false"), log)
    t["knn_s"] = run(cli("knn", "--model.checkpoint", ckpt, "--data.path", str(data), "--data.val_path", str(val),
                         "--knn.k", "1 5", "--run.output_dir", str(out / "knn"), "--run.progress", "false"), log)
    steps = [json.loads(x) for x in (out / "pt" / "metrics.jsonl").read_text().splitlines()]
    t["pretrain_steps_logged"] = [r["step"] for r in steps if r["type"] == "step"]
    t["knn"] = json.loads((out / "knn" / "metrics.json").read_text()).get("acc1")
    return t


def sync_check(size: str) -> dict:
    import torch
    from torch.utils.data import Dataset

    if not torch.cuda.is_available():
        print("sync check: SKIPPED (no CUDA device; torch.cuda.set_sync_debug_mode needs one)")
        return {"sync_check": "skipped: no CUDA"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import SIZES as BENCH
    from bench_train_step import batch_for, build

    from beitv2.data import ImageSpec, resolve_norm
    from beitv2.engine import OptimConfig, TrainConfig, Trainer, TrainingData, init_distributed

    preset = "base" if size == "base" else "tiny"
    parts = build(preset, torch.device("cpu"))
    bs = BENCH[preset][5] // 2
    one = batch_for(parts, bs, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for key in ("image", "tokenizer_image"):  # uint8 views, converted on the device by the trainer
        one[key] = torch.randint(0, 256, one[key].shape, generator=gen, dtype=torch.uint8)
    steps = 12

    class Synthetic(Dataset):
        batch_spec = {"image": ImageSpec(resolve_norm("imagenet", parts["chans"])), "tokenizer_image": ImageSpec()}

        def __len__(self) -> int:
            return bs * steps

        def __getitem__(self, i: int) -> dict:
            return {k: v[i % bs] for k, v in one.items()}

    task = parts["mim"]
    watched: list[int] = []
    start = task.on_step_start

    def on_step_start(step: int) -> None:  # steps 2 .. steps-2 (0-based) are steady state; their checks come after
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if 2 <= step < steps - 1 else "default")
        if 2 <= step < steps - 1:
            watched.append(step)
        start(step)

    task.on_step_start = on_step_start
    cfg = TrainConfig(output_dir="/tmp/beitv2_sync_check", epochs=1, batch_size=bs, log_every_steps=1000,
                      progress=False, tensorboard=False, compile=False, resume="none")
    tr = Trainer(task, TrainingData(Synthetic(), Synthetic.batch_spec), cfg, OptimConfig(lr=1e-4, warmup_epochs=0),
                 dist=init_distributed("cuda"))
    real_check = tr._check

    def check(*a):
        torch.cuda.set_sync_debug_mode("default")  # a check point syncs on purpose
        return real_check(*a)

    tr._check = check
    res = tr.fit()
    torch.cuda.set_sync_debug_mode("default")
    print(f"sync check: {len(watched)} steady-state steps under set_sync_debug_mode('error'): no host sync; "
          f"status {res.status}")
    return {"sync_check": "passed", "steady_steps_checked": len(watched)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--only", choices=["runs", "sync"], default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.only in (None, "sync"):
        result.update(sync_check(args.size))
    if args.only in (None, "runs"):
        result.update(runs(out / "runs", args.size))
    (out / f"gpu_check_{args.only or 'all'}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
