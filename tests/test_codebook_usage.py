"""Remedies for unused codes: the relative dead-code restart (alone and under 2 gloo processes), the diversity loss,
the named remedy (`use_whole_codebook`), and the warning of `beitv2 train-tokenizer` and `beitv2 tokenize` when less
than half of the codebook is in use."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from beitv2.config import ConfigError
from beitv2.models.quantizer import NormEMAQuantizer, QuantizerConfig


def _quantizer(codebook: torch.Tensor, **kw) -> NormEMAQuantizer:
    q = NormEMAQuantizer(QuantizerConfig(num_codes=codebook.shape[0], code_dim=codebook.shape[1], kmeans_init=False,
                                         **kw))
    q.embedding.weight.data.copy_(codebook)
    return q.train()


def _two_clusters(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Unit vectors around +e0 and +e1 of R^4: two codes of an axis codebook take them all."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(4)[:2].repeat_interleave(n // 2, 0)
    return F.normalize(centers + 0.1 * torch.randn(n, 4, generator=g), dim=-1)


def _axis_codebook() -> torch.Tensor:
    """8 unit codes: +e0, +e1, and six codes in the negative orthant no data vector is near."""
    far = F.normalize(-torch.rand(6, 4, generator=torch.Generator().manual_seed(5)) - 0.5, dim=-1)
    return torch.cat([torch.eye(4)[:2], far])


def test_restart_fires_and_reseeds_unused_codes_with_distinct_batch_vectors():
    z = _two_clusters()
    q = _quantizer(_axis_codebook(), decay=0.99, restart_below=0.5, restart_decay=0.0)
    _, _, idx = q(z[None])
    assert set(idx.reshape(-1).tolist()) == {0, 1}  # before the restart only two codes take vectors
    assert q.num_restarted == 6 and q.usage_stats()["restarted"] == 6
    picked = []
    unit = F.normalize(z, dim=-1)  # what the quantizer sees (bit for bit)
    for code in range(2, 8):  # each re-seeded code is exactly one of the batch vectors
        match = (q.codebook[code][None] == unit).all(dim=1).nonzero().reshape(-1).tolist()
        assert len(match) == 1, code
        picked += match
    assert len(set(picked)) == 6  # distinct vectors, so no two restarted codes coincide
    # the restarted codes are used now: the same vectors spread over the whole codebook
    q.eval().reset_usage()
    q.record_usage(q(z[None])[2])
    assert q.usage_stats()["codes_used"] == 8


def test_relative_threshold_waits_for_the_fast_ema_and_leaves_the_official_counts_alone():
    """restart_below 0.05 with restart_decay 0.9: an unused code's recent count starts at the mean count per code
    and falls as 0.9^t, crossing 0.05 of the mean after 29 steps (0.9^28 = 0.052, 0.9^29 = 0.047)."""
    z = _two_clusters()
    q = _quantizer(_axis_codebook(), decay=0.99, restart_below=0.05, restart_decay=0.9)
    for _ in range(28):
        q(z[None])
    assert q.num_restarted == 0
    official = q.cluster_size.clone()
    torch.testing.assert_close(q.recent_counts[2:], torch.full((6,), 0.9 ** 28 * 40 / 8))
    q(z[None])
    assert q.num_restarted == 6
    torch.testing.assert_close(q.recent_counts[2:], torch.full((6,), 40 / 8))  # re-seeded codes restart at the mean
    # the official EMA counts follow their own update, untouched by the restart
    torch.testing.assert_close(q.cluster_size[2:], 0.99 * official[2:])


@pytest.mark.parametrize("batch", [20, 80])
def test_relative_threshold_decides_the_same_at_any_batch_size(batch):
    """A code taking 1 vector in 20 of a step (a fifth of the mean share over 4 codes) is dead for restart_below 0.3
    and alive for 0.1, whatever the number of vectors per step."""
    codes = torch.eye(4)
    n_rare = batch // 20
    z = torch.cat([torch.eye(4)[[0, 1, 2]].repeat(batch, 1)[: batch - n_rare], torch.eye(4)[[3]].repeat(n_rare, 1)])
    for below, restarted in ((0.3, True), (0.1, False)):
        q = _quantizer(codes, decay=0.99, restart_below=below, restart_decay=0.0)
        q(z[None])
        assert (q.num_restarted > 0) == restarted, below


def test_restart_options_are_validated():
    with pytest.raises(ConfigError, match="restart_below"):
        QuantizerConfig(restart_below=-0.1).validate()
    with pytest.raises(ConfigError, match="restart_decay"):
        QuantizerConfig(restart_decay=1.0).validate()
    with pytest.raises(ConfigError, match="entropy_temperature"):
        QuantizerConfig(entropy_temperature=0.0).validate()
    with pytest.raises(ConfigError, match="entropy_weight"):
        QuantizerConfig(entropy_weight=-1.0).validate()


def test_use_whole_codebook_runs_exactly_the_restart_and_the_diversity_loss_it_names():
    """The named remedy is restart_below 0.05 plus entropy_weight 0.02, each where the user left it 0; off is the
    paper's quantizer."""
    resolved = QuantizerConfig(use_whole_codebook=True).resolved()
    assert (resolved.restart_below, resolved.entropy_weight) == (0.05, 0.02)
    assert QuantizerConfig(use_whole_codebook=True, restart_below=0.3).resolved().restart_below == 0.3
    assert QuantizerConfig(restart_below=0.3).resolved() == QuantizerConfig(restart_below=0.3)
    z = _two_clusters()
    named = _quantizer(_axis_codebook(), decay=0.99, restart_decay=0.0, use_whole_codebook=True)
    spelled = _quantizer(_axis_codebook(), decay=0.99, restart_decay=0.0, restart_below=0.05, entropy_weight=0.02)
    paper = _quantizer(_axis_codebook(), decay=0.99, restart_decay=0.0)
    (_, loss_named, idx_named), (_, loss_spelled, idx_spelled) = named(z[None]), spelled(z[None])
    _, loss_paper, _ = paper(z[None])
    torch.testing.assert_close(loss_named, loss_spelled)
    assert torch.equal(idx_named, idx_spelled) and torch.equal(named.codebook, spelled.codebook)
    assert named.num_restarted == 6 and paper.num_restarted == 0  # the six far codes were re-seeded
    assert float(loss_named) < float(loss_paper)  # the diversity term (negative for a spread batch) is in the loss


def test_diversity_loss_is_zero_for_a_collapsed_batch_and_minus_log_k_for_a_spread_one():
    codes = torch.eye(4)
    q = _quantizer(codes, entropy_temperature=0.01)
    collapsed = F.normalize(torch.tensor([[1.0, 0.3, 0.2, 0.1]]).repeat(8, 1), dim=-1)
    assert abs(float(q.diversity_loss(collapsed))) < 1e-5  # every vector's soft assignment is the batch mean
    spread = torch.eye(4).repeat(2, 1)  # sharp assignments, uniform over the codes
    assert float(q.diversity_loss(spread)) == pytest.approx(-math.log(4), abs=1e-4)


def test_diversity_loss_adds_to_the_commitment_and_pushes_vectors_apart():
    codes = torch.eye(4)
    z = F.normalize(torch.tensor([[1.0, 0.5, 0.0, 0.0]]).repeat(6, 1) + 0.01 * torch.randn(6, 4), dim=-1)
    plain = _quantizer(codes, decay=0.99)
    _, commit, _ = plain(z[None])
    w = 0.3
    q = _quantizer(codes, decay=0.99, entropy_weight=w, entropy_temperature=0.1)
    zz = z.clone().requires_grad_(True)
    _, loss, _ = q(zz[None])
    torch.testing.assert_close(loss, commit + w * _quantizer(codes, entropy_temperature=0.1).diversity_loss(z))
    loss.backward()
    # the batch sits between codes 0 and 1; lowering the loss spreads it, so the gradient is not zero
    assert zz.grad.abs().sum() > 1e-3
    # both codebooks took the same EMA step (the term has no say in it), and evaluation adds no diversity term
    torch.testing.assert_close(q.codebook, plain.codebook)
    torch.testing.assert_close(q.eval()(z[None])[1], plain.eval()(z[None])[1])


# ------------------------------------------------------------------------------------------------ 2 gloo ranks

def _rank_batch(rank: int, step: int) -> torch.Tensor:
    """Rank 0's vectors lie around +e0, rank 1's around +e1: a restart drawing from one rank alone would differ."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return F.normalize(torch.eye(4)[rank].repeat(12, 1) + 0.2 * torch.randn(12, 4, generator=g), dim=-1)


def _ranks_quantizer() -> NormEMAQuantizer:
    # the named remedy (diversity loss on) with a higher threshold, so restarts fire within a few steps
    return _quantizer(_axis_codebook(), decay=0.9, use_whole_codebook=True, restart_below=0.5, restart_decay=0.5)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = _ranks_quantizer()
        for step in range(6):
            q(_rank_batch(rank, step)[None])
        torch.save({"codebook": q.codebook.detach().clone(), "restarted": q.num_restarted,
                    "recent": q.recent_counts.clone()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_restart_keeps_every_rank_codebook_identical_and_draws_from_all_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["restarted"] > 0 and r0["restarted"] == r1["restarted"]
    assert torch.equal(r0["codebook"], r1["codebook"]) and torch.equal(r0["recent"], r1["recent"])
    # one process on both ranks' vectors (rank order) makes the same decisions and the same draws
    single = _ranks_quantizer()
    for step in range(6):
        single(torch.cat([_rank_batch(0, step), _rank_batch(1, step)])[None])
    assert single.num_restarted == r0["restarted"]
    torch.testing.assert_close(r0["codebook"], single.codebook.detach(), rtol=1e-5, atol=1e-6)
    # rank 0's codebook holds re-seeded codes near rank 1's data (+e1), not only near its own (+e0)
    assert (r0["codebook"][2:, 1] > 0.8).any() and (r0["codebook"][2:, 0] > 0.8).any()


# ------------------------------------------------------------------------------------------ train-tokenizer warning

def test_train_tokenizer_warns_when_less_than_half_of_the_codebook_is_used(tmp_path, caplog, capsys):
    """512 codes, one epoch of 2 steps x 4 images x 16 patches: at most 128 codes can be used, so the command names
    the remedy's option; the run itself succeeds, its progress bar showing the codes used per batch."""
    import numpy as np
    from PIL import Image

    from beitv2.cli import main

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" /
                                                                                    f"{i}.png")
    teacher = {"kind": "timm", "name_or_path": "vit_tiny_patch16_224", "random_init": True,
               "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}
    vqkd = {"encoder": {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
            "decoder_depth": 1, "quantizer": {"num_codes": 512, "code_dim": 8}, "teacher_dim": 32}
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(yaml.safe_dump({
        "tokenizer": {"type": "vqkd", "vqkd": vqkd}, "teacher": teacher,
        "data": {"kind": "folder", "path": str(tmp_path / "imgs"), "num_workers": 0},
        "optim": {"lr": 1e-3, "lr_reference_batch": 0, "warmup_epochs": 0.5},
        "train": {"epochs": 1, "batch_size": 4, "progress": True, "tensorboard": False, "device": "cpu",
                  "log_every_steps": 1, "output_dir": str(tmp_path / "run")}}))
    with caplog.at_level(logging.WARNING, logger="beitv2.train_tokenizer"):
        assert main(["train-tokenizer", "--config", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "beitv2.train_tokenizer"
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "of 512 codes" in warnings[0] and "use_whole_codebook true" in warnings[0]
    bar = capsys.readouterr().err
    assert "codes=" in bar and "2/2" in bar
    # `beitv2 tokenize` of the same images reads the same health and warns the same way
    caplog.clear()
    out = tmp_path / "codes.safetensors"
    with caplog.at_level(logging.WARNING, logger="beitv2.tokenize"):
        assert main(["tokenize", "--tokenizer.checkpoint", str(tmp_path / "run" / "model.safetensors"), "--data.kind",
                     "folder", "--data.path", str(tmp_path / "imgs"), "--data.num_workers", "0", "--out.path",
                     str(out), "--no-out.progress"]) == 0
    stats = json.loads(Path(str(out) + ".json").read_text())
    assert stats["vocab_size"] == 512 and 1 <= stats["codes_used"] <= 8 * 16
    assert stats["codes_used"] + stats["dead_codes"] == 512 and stats["usage"] == stats["codes_used"] / 512
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "use_whole_codebook true" in warnings[0]
