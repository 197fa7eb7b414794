"""How much class information a VQ-KD tokenizer's codes carry: what MIM on those codes can at best pass on.

    python benchmarks/tokenizer_information.py --tokenizer demo_out/tokenizer/model.safetensors

runs the quickstart's linear probe and k-NN (the plan's training / test images, head, schedule and vote: the rows of
its report) on readings of the codes alone, with the encoder's continuous features thrown away:

* ``code vectors``: the code of every patch (its l2-normalised codebook vector) in place, [N x code_dim];
* ``decoded, mean-pooled``: the teacher-space features the codes decode to, averaged over the patches, as the
  teacher's own row is read;
* ``code histogram``: how often each code occurs in the image, not where.

A student that predicts these codes cannot learn class information that they do not carry, so a low figure here
points at the tokenizer, a figure well above the student's at the student's pre-training (docs/quickstart.md,
"The probe's protocol and the tokenizer's information").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from beitv2.checkpoint import load_model
from beitv2.data import FASHION_MNIST_ROOT
from beitv2.demo import PLANS, linprobe_config, raw_pixel_scores, row_scores
from beitv2.models.vqkd import VQKD

Reading = Callable[[VQKD, torch.Tensor], torch.Tensor]  # (tokenizer, codes [B, N]) -> features [B, F]
READINGS: dict[str, Reading] = {
    "code vectors": lambda tok, codes: tok.quantize.lookup(codes).flatten(1),
    "decoded, mean-pooled": lambda tok, codes: tok.decode_codes(codes).float().mean(1),
    "code histogram": lambda tok, codes: F.one_hot(codes, tok.config.quantizer.num_codes).float().mean(1),
}


def code_encoder(tok: VQKD, reading: Reading, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(images01 [B, C, H, W]) -> [B, F]``: tokenize (resized to the tokenizer's input when needed), then
    read."""
    size = tuple(tok.config.encoder.img_hw)

    @torch.no_grad()
    def encode(images01: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images01), batch):
            x = images01[i:i + batch]
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
            out.append(reading(tok, tok.tokenize(x)).float())
        return torch.cat(out)

    return encode


def measure(tokenizer: Path, root: str, plan_name: str = "full", seed: int = 0, out: Path | None = None,
            readings: tuple[str, ...] = tuple(READINGS)) -> dict[str, dict[str, float | None]]:
    """{reading: {"linprobe_acc1", "knn_acc1" (k = 20)}} with the plan's probe protocol."""
    plan = PLANS[plan_name]
    tok = load_model(tokenizer)[0].eval()
    if not isinstance(tok, VQKD):
        raise SystemExit(f"error: --tokenizer: {tokenizer} holds a {type(tok).__name__}, not a VQ-KD tokenizer")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = out or Path(tmp)
        for name in readings:
            sub = work / name.replace(" ", "_").replace(",", "")
            cfg = linprobe_config(plan, root, tokenizer, sub / "linprobe", sub / "features", seed, progress=False)
            lp, knn = raw_pixel_scores(root, plan.eval_train_subset, plan.test_subset, seed, cfg["probe"],
                                       cfg["optim"], cfg["train"], plan.knn_k, sub / "knn",
                                       encode=code_encoder(tok, READINGS[name], plan.feature_batch),
                                       source=f"tokenizer codes: {name}")
            row = row_scores(plan, lp, knn, None)  # read as the quickstart's report reads its rows
            results[name] = {"linprobe_acc1": row["linprobe_acc1"], "knn_acc1": row["knn_acc1"]}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokenizer", required=True,
                    help="a VQ-KD model file (e.g. a quickstart's tokenizer/model.safetensors)")
    ap.add_argument("--data-path", default=FASHION_MNIST_ROOT, help="folder holding the Fashion-MNIST IDX files")
    ap.add_argument("--plan", choices=tuple(PLANS), default="full", help="whose probe protocol and subsets to use")
    ap.add_argument("--readings", nargs="+", choices=tuple(READINGS), default=list(READINGS), metavar="READING",
                    help=f"which readings (default: all of {', '.join(READINGS)})")
    ap.add_argument("--seed", type=int, default=0, help="the quickstart's seed (the same training subset)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args(argv)
    path = Path(args.tokenizer)
    if not path.is_file():
        print(f"error: --tokenizer: no such file {path}", file=sys.stderr)
        return 2
    if not any(Path(args.data_path).glob("train-images-idx3-ubyte*")):
        print(f"error: --data-path: no Fashion-MNIST IDX files in {args.data_path} (the Debian package "
              "dataset-fashion-mnist installs them; `make data`)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(path, args.data_path, args.plan, args.seed, readings=tuple(args.readings))
    print("| reading of the codes | linear probe (%) | k-NN, k=20 (%) |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['linprobe_acc1']:.2f} | {r['knn_acc1']:.2f} |")
    if args.json:
        summary = {"tokenizer": str(path), "plan": args.plan, "results": results}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
