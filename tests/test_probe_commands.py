"""Linear probe / k-NN on data where the backbone matters: a random backbone is near chance, a trained one is not.

Each 8x8 grey image is noise with one bright 4x4 patch, in the left column (class 0) or the right one (class 1). A
randomly initialised BEiT has a zero relative-position table and a tiny absolute position embedding, so its features
are (nearly) invariant to where the bright patch is: near chance. A tiny ViT trained here for a few steps reads the
position: near 100%. A command that ignored ``--model.checkpoint`` would give the same figure for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beitv2.checkpoint import save_model
from beitv2.cli import main
from beitv2.engine import OptimConfig, TrainConfig
from beitv2.engine.distributed import DistInfo
from beitv2.eval.linprobe import ProbeConfig, ProbeSettings, fit_probe
from beitv2.eval.splits import SplitFeatures
from beitv2.models.backbone import BEiTViT, ViTConfig

ARCH = dict(img_size=(8,), patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, use_abs_pos_emb=True)


def bright_patch_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 2
    x = rng.uniform(0, 120, (n, 8, 8))
    for i in range(n):
        r = rng.integers(0, 2)
        x[i, 4 * r:4 * r + 4, 4 * y[i]:4 * y[i] + 4] += 120
    return np.rint(x).astype(np.uint8), y


@pytest.fixture(scope="module")
def position_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("position")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        x, y = bright_patch_images(64, rng)
        for i in range(len(y)):
            d = root / split / f"c{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i], "L").save(d / f"{i}.png")
    torch.manual_seed(0)
    save_model(root / "random.safetensors", BEiTViT(ViTConfig(**ARCH)))
    # the trained backbone: supervised on other images of the same task (inputs in [-1, 1]; the commands normalise
    # with ImageNet statistics, a shift the probe and k-NN absorb)
    xtr, ytr = bright_patch_images(512, rng)
    torch.manual_seed(0)
    net = BEiTViT(ViTConfig(**ARCH, num_classes=2))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    images = (torch.tensor(xtr, dtype=torch.float32)[:, None] / 255 - 0.5) / 0.5
    labels = torch.tensor(ytr)
    for s in range(150):
        i = torch.arange(s * 32, s * 32 + 32) % 512
        loss = F.cross_entropy(net(images[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.head, net.vit_config.num_classes = torch.nn.Identity(), 0
    save_model(root / "trained.safetensors", net)
    return root


def _acc(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["acc1"]


def test_knn_command_separates_a_trained_from_a_random_backbone(position_task, tmp_path):
    acc = {}
    for ck in ("random", "trained"):
        out = tmp_path / ck
        assert main(["knn", "--model.checkpoint", str(position_task / f"{ck}.safetensors"), "--data.path",
                     str(position_task / "train"), "--data.val_path", str(position_task / "val"), "--knn.k", "5",
                     "--knn.crop_pct", "1.0", "--run.output_dir", str(out), "--run.device", "cpu", "--run.progress",
                     "false", "--run.precision", "fp32", "--data.num_workers", "0"]) == 0
        acc[ck] = _acc(out)
    assert acc["random"] <= 65.0 and acc["trained"] >= 90.0, acc  # 2 classes, 64 validation images


def test_linprobe_command_separates_a_trained_from_a_random_backbone(position_task, tmp_path):
    acc = {}
    for ck in ("random", "trained"):
        out = tmp_path / ck
        assert main(["linprobe", "--model.checkpoint", str(position_task / f"{ck}.safetensors"), "--data.path",
                     str(position_task / "train"), "--data.val_path", str(position_task / "val"),
                     "--features.feature", "cls", "--probe.crop_pct", "1.0", "--optim.lr", "0.05",
                     "--optim.lr_reference_batch", "0", "--train.epochs", "20", "--train.batch_size", "16",
                     "--train.output_dir", str(out), "--train.device", "cpu", "--train.progress", "false",
                     "--train.tensorboard", "false", "--data.num_workers", "0"]) == 0
        acc[ck] = _acc(out)
    assert acc["random"] <= 65.0 and acc["trained"] >= 90.0, acc


@pytest.mark.parametrize("batchnorm", [True, False])
def test_probe_batchnorm_option_on_features_where_it_matters(tmp_path, batchnorm):
    """Class signal in 3 dims at scale 0.05; 5 other dims at scale 1000 around 300. The (affine-free) BatchNorm
    rescales every dim, so with it SGD finds the signal; without it the huge dims swamp the step: chance."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        x = torch.randn(n, 8, generator=g) * 0.01
        x[:, :3] += F.one_hot(y, 3).float() * 0.05
        x[:, 3:] = x[:, 3:] * 1000 + 300.0
        return x, y

    (x, y), (xv, yv) = make(240), make(60)
    train = TrainConfig(output_dir=str(tmp_path), epochs=10, batch_size=40, progress=False, tensorboard=False,
                        device="cpu", precision="fp32")
    optim = OptimConfig(lr=0.1, min_lr=0.0, weight_decay=0.0, warmup_epochs=0.0)
    m = fit_probe(SplitFeatures({4: x}, y, {4: xv}, yv, []),
                  ProbeSettings(ProbeConfig(optimizer="sgd", batchnorm=batchnorm), optim, train),
                  DistInfo(0, 1, 0, torch.device("cpu")))
    if batchnorm:
        assert m["acc1"] == 100.0
    else:
        assert m["acc1"] <= 50.0
