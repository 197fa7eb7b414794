"""The update the optimizer actually applies, read from parameter values after real `Trainer` steps.

With a loss linear in every parameter, ``loss = sum(c * p)`` with ``c = +-1``, AdamW's bias-corrected moment ratio is
exactly ``sign(c)`` at every step, so one step is, per parameter,

    p <- p * (1 - lr_t * s * wd_t [decayed groups only]) - lr_t * s * c / (1 + eps)

with ``s`` the group's layer-decay scale, ``lr_t`` the official warmup + cosine schedule (peak scaled by
total_batch / lr_reference_batch) and ``wd_t`` the cosine weight-decay schedule to ``weight_decay_end``. The schedules
and the decay / no-decay split are written out here from the official recipe, not taken from the library.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from builders import tiny_mim, tiny_vit
from torch.utils.data import Dataset

from beitv2.engine import OptimConfig, TrainConfig, Trainer, build_optimizer, init_distributed
from beitv2.models.backbone import BEiTViT
from beitv2.tasks import TrainTask

EPS = 1e-8


class Eight(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}


class LinearLoss(TrainTask):
    """loss = sum over parameters of (c * p).sum(); records every parameter at the start of each optimizer step."""

    def __init__(self, model):
        super().__init__(model)
        g = torch.Generator().manual_seed(0)
        self.signs = {n: torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for n, p in model.named_parameters()}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, batch):
        if self.step not in self.snapshots:
            self.snapshots[self.step] = {n: p.detach().double().clone() for n, p in self.model.named_parameters()}
        loss = sum((self.signs[n] * p).sum() for n, p in self.model.named_parameters())
        return loss, {}


def official_lr(base: float, final: float, total: int, warmup: int) -> list[float]:
    head = [base * i / (warmup - 1) for i in range(warmup)] if warmup > 1 else [0.0] * warmup
    n = total - warmup
    return head + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


def official_wd(start: float, end: float, total: int) -> list[float]:
    return [end + 0.5 * (start - end) * (1 + math.cos(math.pi * i / total)) for i in range(total)]


def randomise(model: torch.nn.Module) -> None:
    """Unit-scale values everywhere (zero biases would hide a wrongly applied decay)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def run(tmp_path, model, ocfg: OptimConfig, *, batch: int, accum: int, epochs: int, **trainer_kw) -> LinearLoss:
    randomise(model)
    task = LinearLoss(model)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=epochs, batch_size=batch, accum_steps=accum, precision="fp32",
                      progress=False, tensorboard=False, log_every_steps=100, keep_last=1)
    tr = Trainer(task, Eight(), cfg, ocfg, dist=init_distributed("cpu"), **trainer_kw)
    res = tr.fit()
    assert res.status == "finished"
    task.snapshots[res.global_step] = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    return task


def check_updates(task: LinearLoss, lrs: list[float], wds: list[float], decayed, scale) -> None:
    assert sorted(task.snapshots) == list(range(len(lrs) + 1))
    for t, (lr, wd) in enumerate(zip(lrs, wds)):
        before, after = task.snapshots[t], task.snapshots[t + 1]
        for n, p in before.items():
            eff_lr = lr * scale(n)
            expect = p * (1 - eff_lr * wd * decayed(n)) - eff_lr * task.signs[n].double() / (1 + EPS)
            torch.testing.assert_close(after[n], expect, rtol=0, atol=2e-6,
                                       msg=lambda m, n=n, t=t: f"{n} at step {t}: {m}")


SMALL = {"img_size": (8,), "embed_dim": 8}  # a 2 x 2 grid, 8 wide: few parameters to follow by hand


def default_decayed(name: str, p_ndim: int) -> bool:
    """Default split: 1-d tensors, biases and the token / position / rel-pos tables are not decayed."""
    if p_ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(k in name.split(".") for k in ("pos_embed", "cls_token", "mask_token",
                                                     "relative_position_bias_table"))


@pytest.mark.parametrize("official", [False, True])
def test_pretraining_update_per_group_with_lr_and_wd_schedules(tmp_path, official):
    model = tiny_mim(vit={**SMALL, "use_abs_pos_emb": True}, vocab_size=8)
    ocfg = OptimConfig(lr=0.04, min_lr=1e-3, lr_reference_batch=8, weight_decay=0.3, weight_decay_end=0.05,
                       warmup_steps=3, official_no_decay=official)
    task = run(tmp_path, model, ocfg, batch=2, accum=2, epochs=4)  # 2 steps per epoch, total batch 4
    total = 8
    lrs = official_lr(0.04 * 4 / 8, 1e-3, total, 3)
    wds = official_wd(0.3, 0.05, total)
    ndim = {n: p.ndim for n, p in model.named_parameters()}
    if official:  # the official pre-training split decays mask_token and the rel-pos table
        def decayed(n):
            return not (ndim[n] <= 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token"))
        assert decayed("mask_token") and decayed("rel_pos_bias.relative_position_bias_table")
    else:
        def decayed(n):
            return default_decayed(n, ndim[n])
        assert not decayed("mask_token") and not decayed("rel_pos_bias.relative_position_bias_table")
    assert decayed("blocks.0.attn.qkv.weight") and not decayed("blocks.0.gamma_1") and not decayed("norm.bias")
    check_updates(task, lrs, wds, decayed, lambda n: 1.0)


def test_constant_weight_decay_without_end_and_no_lr_scaling(tmp_path):
    model = BEiTViT(tiny_vit(**SMALL, num_classes=3))
    ocfg = OptimConfig(lr=0.01, min_lr=0.002, weight_decay=0.2, warmup_steps=0, warmup_epochs=0)
    task = run(tmp_path, model, ocfg, batch=4, accum=1, epochs=2)  # 4 steps, total batch 4, no reference batch
    ndim = {n: p.ndim for n, p in model.named_parameters()}
    check_updates(task, official_lr(0.01, 0.002, 4, 0), [0.2] * 4, lambda n: default_decayed(n, ndim[n]),
                  lambda n: 1.0)


def test_finetune_layer_decay_lr_scale_per_group(tmp_path):
    from beitv2.eval.finetune import layer_id_fn

    depth, decay = 2, 0.5
    model = BEiTViT(tiny_vit(**SMALL, num_classes=3, use_rel_pos_bias=True, use_shared_rel_pos_bias=False))
    ocfg = OptimConfig(lr=0.02, min_lr=0.001, weight_decay=0.1, warmup_steps=1, layer_decay=decay)
    task = run(tmp_path, model, ocfg, batch=4, accum=1, epochs=2,
               optimizer=partial(build_optimizer, layer_id_fn=layer_id_fn(depth), num_layers=depth + 2))

    def scale(n: str) -> float:  # official get_num_layer_for_vit: embeddings 0, block k -> k + 1, the rest depth + 1
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            layer = 0
        elif n.startswith("blocks."):
            layer = int(n.split(".")[1]) + 1
        else:
            layer = depth + 1
        return decay ** (depth + 1 - layer)

    assert scale("cls_token") == 0.125 and scale("head.weight") == 1.0
    ndim = {n: p.ndim for n, p in model.named_parameters()}
    check_updates(task, official_lr(0.02, 0.001, 4, 1), [0.1] * 4, lambda n: default_decayed(n, ndim[n]), scale)
