"""Engine unit tests on tiny real models: parameter groups, schedules, accumulation, checkpoints, stop/NaN handling."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import tiny_mim, tiny_vit
from torch.utils.data import Dataset, IterableDataset

from beitv2.config import ConfigError, build_config
from beitv2.engine import (
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    Trainer,
    TrainingData,
    cosine_schedule,
    find_resume,
    init_distributed,
    param_groups,
    seed_everything,
    warmup_iterations,
)
from beitv2.engine import state as S
from beitv2.engine.schedule import poly_schedule
from beitv2.models.backbone import BEiTViT
from beitv2.tasks import TrainTask


class Blobs(Dataset):
    """Deterministic random images with labels; ``nan_at`` poisons one image."""

    def __init__(self, n: int = 16, nan_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        if nan_at is not None:
            self.x[nan_at] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


class Classify(TrainTask):
    def __init__(self, model, kill_at_step: int | None = None):
        super().__init__(model)
        self.kill_at_step = kill_at_step

    def forward(self, batch):
        if self.kill_at_step is not None and self.step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        logits = self.net(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"acc": (logits.argmax(-1) == batch["label"]).float().mean()}


def make_trainer(tmp_path: Path, *, batch: int = 8, accum: int = 1, epochs: int = 1, data=None, task=None,
                 **train_kw) -> Trainer:
    seed_everything(0)
    model = BEiTViT(tiny_vit(num_classes=4))
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=epochs, batch_size=batch, accum_steps=accum,
                      precision="fp32", progress=False, tensorboard=False, log_every_steps=1, **train_kw)
    ocfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_epochs=0, weight_decay=0.05)
    return Trainer(task or Classify(model), data or Blobs(), cfg, ocfg, dist=init_distributed("cpu"))


# ---------------------------------------------------------------------------------------------- optimizer groups

def _decay_of(groups: list[dict]) -> dict[str, bool]:
    return {n: g["apply_wd"] for g in groups for n in g["param_names"]}


def test_no_decay_groups_default_and_official():
    model = tiny_mim(vit={"use_abs_pos_emb": True}, vocab_size=64)
    decay = _decay_of(param_groups(model, OptimConfig()))
    for name in ("mask_token", "cls_token", "pos_embed", "rel_pos_bias.relative_position_bias_table",
                 "blocks.0.attn.q_bias", "blocks.0.gamma_1", "norm.weight", "lm_head.bias"):
        assert decay[name] is False, name
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight", "lm_head.weight"):
        assert decay[name] is True, name
    official = _decay_of(param_groups(model, OptimConfig(official_no_decay=True)))
    # the official pretraining code decays mask_token and the shared rel-pos table (it skips pos_embed, cls_token)
    assert official["mask_token"] and official["rel_pos_bias.relative_position_bias_table"]
    assert not official["cls_token"] and not official["pos_embed"] and not official["norm.weight"]


def test_layer_decay_scales():
    model = BEiTViT(tiny_vit(num_classes=4))
    depth = model.vit_config.depth

    def layer_id(name: str) -> int:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    groups = param_groups(model, OptimConfig(layer_decay=0.5), layer_id_fn=layer_id)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["cls_token"] == pytest.approx(0.5 ** (depth + 1))
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert scale["blocks.1.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - 1))
    assert scale["head.weight"] == 1.0


# ---------------------------------------------------------------------------------------------------- schedules

def test_cosine_schedule_warmup_from_zero_to_min_lr():
    s = cosine_schedule(1e-3, 1e-5, total_steps=100, warmup_steps=10)
    assert len(s) == 100 and s[0] == 0.0
    assert s[9] == pytest.approx(1e-3) and s[10] == pytest.approx(1e-3)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) < 0)
    n = 90
    assert s[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (n - 1) / n)))
    assert s[-1] < 1.1e-5
    assert s[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # the cosine's midpoint


def test_poly_schedule_with_final_lr_and_warmup_by_hand():
    """mmcv's `PolyLrUpdaterHook` written out: (base - min_lr) * (1 - i / total) ** power + min_lr, times the linear
    warmup factor 1 - (1 - i / warmup) * (1 - warmup_ratio) during the warmup steps."""
    base, final, total, warm, power, ratio = 0.1, 0.02, 12, 4, 0.9, 0.1
    want = []
    for i in range(total):
        lr = (base - final) * (1 - i / total) ** power + final
        if i < warm:
            lr *= 1 - (1 - i / warm) * (1 - ratio)
        want.append(lr)
    got = poly_schedule(base, final, total, warmup_steps=warm, power=power, warmup_ratio=ratio)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_warmup_in_epochs_or_steps():
    assert warmup_iterations(1000, 50, warmup_epochs=2) == 100
    assert warmup_iterations(1000, 50, warmup_epochs=0, warmup_steps=30) == 30  # the official scheduler fails here
    assert warmup_iterations(20, 50, warmup_epochs=5) == 20
    assert len(cosine_schedule(1.0, 0.0, 50, warmup_steps=30)) == 50


def test_bad_optim_value_names_field():
    with pytest.raises(ConfigError, match=r"^lr: must be > 0"):
        build_config(OptimConfig, overrides={"lr": -1.0})
    with pytest.raises(ConfigError, match=r"accum_steps"):
        build_config(TrainConfig, overrides={"accum_steps": 0})


# ------------------------------------------------------------------------------------------- training behaviour

def test_grad_accumulation_equivalence(tmp_path):
    """One step of batch 8 == one step of 2 accumulated micro-batches of 4 (same data, fp32)."""
    a = make_trainer(tmp_path / "a", batch=8, accum=1, data=Blobs(8))
    before = [p.detach().clone() for p in a.task.model.parameters()]
    a.fit()
    b = make_trainer(tmp_path / "b", batch=4, accum=2, data=Blobs(8))
    b.fit()
    assert a.global_step == b.global_step == 1
    # warmup 0: step 0 already uses the peak lr, so the weights moved
    assert max((p0 - p1).abs().max() for p0, p1 in zip(before, a.task.model.parameters())) > 1e-4
    for (n, pa), pb in zip(a.task.model.named_parameters(), b.task.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_checkpoints_atomic_and_resume_ignores_debris(tmp_path):
    tr = make_trainer(tmp_path, batch=4, epochs=2, save_every_steps=1, keep_last=2)
    res = tr.fit()
    assert res.status == "finished" and res.global_step == 8
    ckpts = S.list_checkpoints(tmp_path)
    assert [s for s, _ in ckpts] == [7, 8]  # keep_last
    assert (tmp_path / "latest").read_text().strip() == "ckpt-8"
    assert (tmp_path / "model.safetensors").is_file()
    # a crashed writer's temp dir and an incomplete directory are never picked
    (tmp_path / ".tmp-ckpt-99-1").mkdir()
    (tmp_path / ".tmp-ckpt-99-1" / S.WEIGHTS).write_bytes(b"partial")
    (tmp_path / "ckpt-50").mkdir()
    (tmp_path / "ckpt-50" / S.WEIGHTS).write_bytes(b"no state file")
    assert find_resume(tmp_path, "auto") == tmp_path / "ckpt-8"
    st = S.load_train_state(tmp_path / "ckpt-8")  # weights_only load
    assert st["global_step"] == 8 and len(st["rng"]) == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    assert [x["step"] for x in steps] == list(range(1, 9))
    assert {"lr", "wd", "loss", "acc", "grad_norm", "images_per_s"} <= set(steps[0])
    assert sum(x["type"] == "epoch" for x in lines) == 2


def test_rng_state_roundtrip(tmp_path):
    seed_everything(3)
    st = S.rng_state()
    torch.save(st, tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    S.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_sigterm_saves_at_step_boundary_and_resume_matches(tmp_path):
    full = make_trainer(tmp_path / "full", batch=4, epochs=2)
    full.fit()
    tr = make_trainer(tmp_path / "cut", batch=4, epochs=2)
    tr.task.kill_at_step = 5  # SIGTERM arrives during step 5 (0-based): step 5 completes, then it saves and stops
    handler = signal.getsignal(signal.SIGTERM)
    res = tr.fit()
    assert res.status == "interrupted" and res.global_step == 6 and res.exit_code == 128 + signal.SIGTERM
    assert [s for s, _ in S.list_checkpoints(tmp_path / "cut")] == [4, 6]  # epoch end 4, then the signal
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    again = make_trainer(tmp_path / "cut", batch=4, epochs=2)
    res = again.fit()
    assert res.status == "finished" and res.global_step == 8
    for (n, p), q in zip(full.task.model.named_parameters(), again.task.model.parameters()):
        assert torch.equal(p, q), n


def test_non_finite_loss_stops_without_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, batch=4, data=Blobs(16, nan_at=0), save_every_steps=1)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step") as err:
        tr.fit()
    bad_step = int(str(err.value).split("at step ")[1].split()[0])
    steps = [s for s, _ in S.list_checkpoints(tmp_path)]
    assert steps == list(range(max(1, bad_step - 2), bad_step + 1)) if bad_step else steps == []
    for _, path in S.list_checkpoints(tmp_path):
        from beitv2.checkpoint import load_state_dict

        assert all(torch.isfinite(t).all() for t in load_state_dict(path).values() if t.is_floating_point())


def test_too_small_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        make_trainer(tmp_path, batch=32, data=Blobs(8))


class NaNGradientAt(Classify):
    """A finite loss whose gradients are NaN at one step: 0 * sqrt(0) adds nothing forward, and 0 * inf backward."""

    def __init__(self, model, step: int):
        super().__init__(model)
        self.bad = step

    def forward(self, batch):
        loss, metrics = super().forward(batch)
        if self.step == self.bad:
            zero = next(self.net.parameters()).sum() * 0
            loss = loss + 0 * torch.sqrt(zero)
        return loss, metrics


def test_non_finite_gradients_skip_the_step_on_the_device_without_optimizer_attributes(tmp_path):
    """Fused AdamW with a finite loss but NaN gradients: the step is skipped (the weights equal those of a run that
    stopped before it), the error names the gradients, and no attribute is left on the optimizer."""
    ref = make_trainer(tmp_path / "ref", batch=4, stop_after_steps=2)
    ref.fit()
    seed_everything(0)
    model = BEiTViT(tiny_vit(num_classes=4))
    tr = make_trainer(tmp_path / "bad", batch=4, task=NaNGradientAt(model, step=2))
    assert tr.step_skips_on_device
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at step 2 \(loss [0-9.]+, gradient norm nan"):
        tr.fit()
    for (n, p), q in zip(ref.task.model.named_parameters(), tr.task.model.parameters()):
        assert torch.equal(p, q), n
    assert not hasattr(tr.optimizer, "found_inf") and not hasattr(tr.optimizer, "grad_scale")
    assert [s for s, _ in S.list_checkpoints(tmp_path / "bad")] == []


class Recorded(Blobs):
    """A data set whose per-epoch call the caller states in a `TrainingData` (the trainer asks the data set
    nothing)."""

    def __init__(self):
        super().__init__(16)
        self.epochs: list[int] = []


def test_the_training_data_contract_is_what_the_trainer_uses(tmp_path):
    data = Recorded()
    make_trainer(tmp_path / "a", batch=4, epochs=3, data=TrainingData(data, set_epoch=data.epochs.append)).fit()
    assert data.epochs == [0, 1, 2]
    resumed = Recorded()  # a run resumed in epoch 1 points the data at epoch 1 first
    make_trainer(tmp_path / "b", batch=4, epochs=3, stop_after_steps=6).fit()
    make_trainer(tmp_path / "b", batch=4, epochs=3, data=TrainingData(resumed, set_epoch=resumed.epochs.append)).fit()
    assert resumed.epochs == [1, 2]
    plain = Recorded()
    plain.set_epoch = plain.epochs.append  # not stated: a plain data set is not probed for it
    make_trainer(tmp_path / "c", batch=4, data=plain).fit()
    assert plain.epochs == []


def test_a_stream_needs_its_epoch_length_stated(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from Blobs(16)

    with pytest.raises(TypeError, match="TrainingData"):
        make_trainer(tmp_path, batch=4, data=Stream())
    with pytest.raises(ConfigError, match="data.num_samples"):
        make_trainer(tmp_path, batch=4, data=TrainingData(Stream(), set_plan=lambda plan: None))
