"""BEiT v1's blockwise masks (no exact-count top-up) hold different numbers of patches per image: such a batch must
still collate and train (the model then takes the boolean masks; only exact-count masks carry stacked positions)."""

from __future__ import annotations

import json

import numpy as np
import torch

from beitv2.cli import main
from beitv2.data.collate import collate_skip_bad
from beitv2.data.samples import MIMDataset
from beitv2.masking import BlockwiseMaskGenerator


def test_v1_masks_of_different_counts_collate_without_positions():
    gen = BlockwiseMaskGenerator(7, 20, min_num_patches=4, top_up=False, seed=0)
    images = [np.zeros((4, 4), dtype=np.uint8)] * 16
    ds = MIMDataset(list(zip(images, range(16), strict=True)), lambda img: (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)),
                    gen, seed=0)
    samples = [ds.make(img, 0, i, np.random.default_rng(i)) for i, img in enumerate(images)]
    counts = {int(s["mask"].sum()) for s in samples}
    assert len(counts) > 1  # the v1 generator stops where its blocks reached: counts differ within a batch
    batch = collate_skip_bad(samples)
    assert "mask_index" not in batch and batch["mask"].shape == (16, 49)
    exact = MIMDataset(ds.base, ds.transform, BlockwiseMaskGenerator(7, 20, min_num_patches=4, seed=0), seed=0)
    batch = collate_skip_bad([exact.make(img, 0, i, np.random.default_rng(i)) for i, img in enumerate(images)])
    assert batch["mask_index"].shape == (16, 20)
    assert torch.equal(batch["mask"].nonzero()[:, 1].view(16, 20), batch["mask_index"])


def test_pretraining_with_v1_masks_runs(tmp_path):
    out = tmp_path / "pt"
    rc = main(["pretrain", "--preset", "beitv2_tiny_fmnist", "--model.target", "pixels", "--data.kind", "fmnist",
               "--data.subset", "32", "--data.val_subset", "0", "--data.num_workers", "0", "--train.batch_size", "16",
               "--train.epochs", "1",
               "--train.precision", "fp32", "--no-train.progress", "--no-train.tensorboard", "--mask.top_up", "false",
               "--mask.num_masking_patches", "20", "--mask.min_num_patches", "4", "--train.output_dir", str(out)])
    assert rc == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r.get("type") == "step" and "loss" in r]
    assert losses and all(np.isfinite(losses))
