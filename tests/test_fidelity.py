"""Behaviour that must match the official microsoft/unilm code (or differ from it only by a named option)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beitv2.checkpoint import load_state_dict, save_model
from beitv2.cli import main
from beitv2.data import collate_skip_bad
from beitv2.data.mim_dataset import TransformDataset
from beitv2.engine.sampler import ResumableSampler
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

COMMON = ["--train.device", "cpu", "--train.progress", "false", "--train.tensorboard", "false"]


def tiny_vit(**kw) -> ViTConfig:
    base = dict(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=0.1)
    base.update(kw)
    return ViTConfig(**base)


class Constant:
    """The same image at every index, so a sample differs from another only by its random draws."""

    labels = np.zeros(16, dtype=np.int64)

    def __init__(self, n: int = 16):
        rng = np.random.default_rng(0)
        self.img = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.img, 0


def _probe(img):
    """What timm's transforms draw from: Python's `random`, numpy's global generator (and torch)."""
    return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def _rank_batches(ds, rank: int, workers: int) -> list[dict]:
    sampler = ResumableSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
    # the loader generator as the old trainer seeded it: train.seed on every rank (the worst case)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator().manual_seed(0))
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_draw_different_augmentations(workers):
    """Every RNG a fine-tuning transform uses is seeded per sample from (seed, epoch, index): two ranks at the same
    batch slot draw different values (and so different RandAugment ops), the same index draws the same values
    whichever rank or worker makes it, and the caller's RNG streams are left untouched."""
    ds = TransformDataset(Constant(), _probe, seed=0)
    r0, r1 = _rank_batches(ds, 0, workers), _rank_batches(ds, 1, workers)
    for b0, b1 in zip(r0, r1):
        for x0, x1 in zip(b0["image"], b1["image"]):
            assert (x0 != x1).all(), (x0, x1)  # python, numpy and torch draws all differ between the ranks
        for i, x in zip(b0["index"].tolist(), b0["image"]):
            assert torch.equal(ds[i]["image"], x)  # a function of the index alone
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ds[3]
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])


def test_randaugment_differs_between_ranks_at_the_same_slot():
    """The fine-tuning transform itself (RandAugment + RandomResizedCrop, which draw from Python's `random` only
    with flips and erasing off) gives different images on two ranks: before per-sample seeding of `random` both
    ranks' workers applied the same ops to the same slot."""
    from beitv2.commands.finetune import FinetuneAugConfig, train_transform

    tf = train_transform(FinetuneAugConfig(hflip=0.0, reprob=0.0), (16, 16), 3, "imagenet")
    ds = TransformDataset(Constant(), tf, seed=0)
    r0, r1 = _rank_batches(ds, 0, 2), _rank_batches(ds, 1, 2)
    same = sum(torch.equal(x0, x1) for b0, b1 in zip(r0, r1) for x0, x1 in zip(b0["image"], b1["image"]))
    assert same == 0


def _folder(root: Path, n_per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_finetune_resumes_bitwise_with_randaugment_and_mixup(tmp_path):
    """An interrupted fine-tuning run (RandAugment, random erasing, Mixup/CutMix, drop path, two data-loader
    workers) resumed from its mid-epoch checkpoint ends with the uninterrupted run's weights, bit for bit."""
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "mim.safetensors", BEiTv2ForMIM(MIMConfig(backbone=tiny_vit(), vocab_size=16,
                                                                            early_layers=1, head_layers=1)))
    data = _folder(tmp_path / "imgs")
    full, cut = tmp_path / "full", tmp_path / "cut"

    def args(out: Path) -> list[str]:
        return ["finetune", "--model.checkpoint", str(ckpt), "--data.path", str(data), "--data.num_workers", "2",
                "--aug.rand_aug", "rand-m9-mstd0.5-inc1", "--aug.mixup", "0.8", "--aug.cutmix", "1.0",
                "--model.drop_path", "0.1", "--train.epochs", "2", "--train.batch_size", "4",
                "--optim.warmup_epochs", "1", "--train.output_dir", str(out), *COMMON]

    assert main(args(full)) == 0
    assert main([*args(cut), "--train.stop_after_steps", "3"]) == 0
    assert not (cut / "model.safetensors").exists()
    assert main(args(cut)) == 0
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
