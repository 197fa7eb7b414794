"""The fast step stays correct: index gather vs boolean indexing, last blocks limited to the rows the loss reads vs a
whole-block reference written here, fused vs unfused AdamW, compiled vs eager, metrics kept on the device and read
only at check points, quantizer statistics without bincount."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import load_benchmark
from builders import tiny_mim, tiny_vit, tiny_vqkd
from torch.utils.data import Dataset

from beitv2.engine import OptimConfig, TrainConfig, Trainer, build_optimizer, init_distributed, seed_everything
from beitv2.engine import state as S
from beitv2.engine.trainer import COMPILE_AUTO_MIN_STEPS, NonFiniteLossError, resolve_compile
from beitv2.masking import build_mask_generator
from beitv2.mim_targets import TokenTarget
from beitv2.models.backbone import ViTConfig, make_block, select_rows
from beitv2.models.mim import BEiTv2ForMIM, MaskedPatches
from beitv2.models.quantizer import NormEMAQuantizer, QuantizerConfig
from beitv2.models.vqkd import VQKD
from beitv2.tasks import MIMTask


def tiny_parts(seed: int = 0) -> tuple[BEiTv2ForMIM, VQKD]:
    """A MIM model and its tokenizer, drawn one after the other from one seed."""
    mim = tiny_mim(seed=seed)
    return mim, tiny_vqkd(kmeans_init=False).eval()


def mim_batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    gen = build_mask_generator("block", (4, 4), 6, min_num_patches=2)
    rng = np.random.default_rng(seed)
    masks = torch.stack([torch.from_numpy(gen(rng)).flatten() for _ in range(n)])
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "tokenizer_image": torch.rand(n, 3, 16, 16, generator=g),
            "mask": masks, "mask_index": torch.stack([m.nonzero().flatten() for m in masks])}


def loss_and_grads(task: MIMTask, batch: dict) -> tuple[torch.Tensor, dict, dict]:
    task.model.zero_grad(set_to_none=True)
    loss, metrics = task(batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


def test_masked_patches_take_what_boolean_indexing_takes():
    """From an index or a boolean mask, `take` gives ``x[mask]`` (row-major), for tokens and for per-patch labels;
    a boolean mask whose rows mask different counts pads the shorter rows and drops the padding again."""
    x = torch.randn(3, 10, 5)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    for b, pos in enumerate([[0, 4, 9], [1, 2, 3], [5, 7, 8]]):
        mask[b, pos] = True
    index = torch.stack([m.nonzero().flatten() for m in mask])
    for given in (index, mask, mask.reshape(3, 2, 5)):
        m = MaskedPatches(given, 10)
        assert torch.equal(m.mask, mask) and torch.equal(m.index, index) and m.keep is None
        assert torch.equal(m.take(x), x[mask]) and torch.equal(m.take(x[..., 0]), x[..., 0][mask])
    ragged = mask.clone()
    ragged[0, 9] = False
    ragged[2, :] = True
    m = MaskedPatches(ragged, 10)
    assert m.index.shape == (3, 10) and m.keep.sum(1).tolist() == [2, 3, 10]
    assert torch.equal(m.take(x), x[ragged]) and torch.equal(m.take(x[..., 1]), x[..., 1][ragged])
    with pytest.raises(ValueError, match="12 patches"):
        MaskedPatches(torch.zeros(3, 12, dtype=torch.bool), 10)


def test_mim_step_with_index_gather_equals_boolean_path():
    """The index the data ships and the boolean mask it came from give the same step, bit for bit (one forward path:
    the mask is converted to an index inside)."""
    mim, vq = tiny_parts()
    task = MIMTask(mim, TokenTarget(vq)).train()
    batch = mim_batch()
    slow = {k: v for k, v in batch.items() if k != "mask_index"}
    l_bool, m_bool, g_bool = loss_and_grads(task, slow)
    l_idx, m_idx, g_idx = loss_and_grads(task, batch)
    assert torch.equal(l_bool, l_idx)
    assert m_bool.keys() == m_idx.keys() and all(torch.equal(m_bool[k], m_idx[k]) for k in m_bool)
    assert g_bool.keys() == g_idx.keys() and len(g_idx) > 10
    for n in g_bool:
        assert torch.equal(g_bool[n], g_idx[n]), n


@pytest.mark.parametrize("qkv_bias,own_table,fused", [(True, False, True), (True, True, False), (False, False, True)])
def test_block_limited_to_rows_equals_the_whole_block_at_those_rows(qkv_bias, own_table, fused):
    """Outputs and gradients of a block limited to ``rows`` are the whole block's at those rows, whatever the bias
    layout (shared table, per-layer table, no q/v bias) and attention form; stochastic depth draws the same masks."""
    torch.manual_seed(0)
    cfg = tiny_vit(depth=1, qkv_bias=qkv_bias, drop_path_rate=0.0)
    blk = make_block(cfg, drop_path=0.3, window_size=(4, 4) if own_table else None).train()
    blk.attn.fused_attn = fused
    if own_table:
        nn.init.normal_(blk.attn.relative_position_bias_table)
    x = torch.randn(3, 17, 32, requires_grad=True)
    shared = torch.randn(2, 17, 17, requires_grad=True)
    rows = torch.stack([torch.tensor([0, 2, 5, 16]), torch.tensor([0, 1, 3, 4]), torch.tensor([0, 9, 10, 11])])
    torch.manual_seed(1)
    full = select_rows(blk(x, shared_rel_pos_bias=shared), rows)
    g_full = torch.autograd.grad(full.square().sum(), [x, shared, *blk.parameters()])
    torch.manual_seed(1)
    part = blk(x, shared, rows)
    g_part = torch.autograd.grad(part.square().sum(), [x, shared, *blk.parameters()])
    assert part.shape == (3, 4, 32) and torch.allclose(full, part, atol=1e-5)
    # stochastic depth did drop something, so the draws were compared
    assert not torch.equal(full, select_rows(blk.eval()(x, shared_rel_pos_bias=shared), rows))
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, atol=1e-5)


def whole_blocks_mim(m: BEiTv2ForMIM, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The MIM forward with every block whole and the masked tokens picked by boolean indexing after the final norm
    (the form of the official code): the benchmark's reference path (`bench_train_step.WholeBlocksMIM`), checked here
    so that the benchmark's baseline is the library's forward computed the long way."""
    return load_benchmark("bench_train_step").WholeBlocksMIM(m)(images, mask.reshape(images.shape[0], -1))


@pytest.mark.parametrize("kw", [dict(), dict(patch_aggregation=False), dict(early_layers=2),
                                dict(drop_path=0.2), dict(grad_checkpointing=True)])
def test_trimmed_last_blocks_give_the_whole_blocks_loss_and_grads(kw):
    """The model computes only CLS + masked rows in the last backbone block and masked rows in the last aggregation
    block; loss, metrics and every gradient equal those of the whole-block reference above, on the index and the
    boolean mask. early_layers = depth feeds the whole last block to the aggregation head, so the backbone is not
    trimmed."""
    kw = dict(kw)
    vit = {"drop_path_rate": kw.pop("drop_path", 0.0), "grad_checkpointing": kw.pop("grad_checkpointing", False)}
    mim = tiny_mim(seed=0, vit=vit, **{"head_layers": 2, **kw})
    _, vq = tiny_parts()
    task = MIMTask(mim, TokenTarget(vq)).train()
    batch = mim_batch()

    class WholeBlocks(nn.Module):
        def forward(self, images, mask):
            return whole_blocks_mim(mim, images, mask)

    runs = []
    for net, b in ((mim, batch), (mim, {k: v for k, v in batch.items() if k != "mask_index"}),
                   (WholeBlocks(), {k: v for k, v in batch.items() if k != "mask_index"})):
        task.wrap(net)
        torch.manual_seed(3)
        runs.append(loss_and_grads(task, b))
    (l0, m0, g0) = runs[0]
    for l1, m1, g1 in runs[1:]:
        assert torch.allclose(l0, l1, atol=1e-6)
        assert all(torch.allclose(m0[k], m1[k], atol=1e-6) for k in m0)
        assert g0.keys() == g1.keys() and len(g0) > 10
        for n in g0:
            assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def test_fused_adamw_is_the_default_and_matches_the_for_loop():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fast, slow = build_optimizer(a, cfg), build_optimizer(b, cfg, fused=False)
    assert fast.defaults["fused"] and not slow.defaults["fused"]
    for _ in range(3):
        x = torch.randn(4, 8)
        for m, opt in ((a, fast), (b, slow)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_fused_adamw_found_inf_skips_the_step():
    m = torch.nn.Linear(4, 4)
    opt = build_optimizer(m, OptimConfig(lr=1e-1))
    before = [p.clone() for p in m.parameters()]
    m(torch.randn(2, 4)).sum().backward()
    opt.grad_scale, opt.found_inf = None, torch.ones(())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(float(s["step"]) == 0 for s in opt.state.values())


def test_resolve_compile_auto():
    cpu = torch.device("cpu")
    assert resolve_compile(True, cpu, 1) and not resolve_compile(False, cpu, 10**6)
    assert not resolve_compile(None, cpu, 10**6)  # auto leaves CPU runs eager
    cuda = torch.device("cuda")
    assert not resolve_compile(None, cuda, COMPILE_AUTO_MIN_STEPS - 1)
    assert resolve_compile(None, cuda, COMPILE_AUTO_MIN_STEPS)
    assert not resolve_compile(None, torch.device("meta"), 10**6)


def test_compiled_mim_step_matches_eager():
    """The index-gather model compiles as ONE graph (fullgraph: no data-dependent shape, no host sync) and gives the
    eager loss, metrics and gradients. The aot_eager backend traces forward and backward as Inductor's input does,
    in seconds; Inductor's own code generation (a minute of C++ compiles here) is timed by the benchmark instead."""
    mim, vq = tiny_parts()
    task = MIMTask(mim, TokenTarget(vq)).train()
    batch = mim_batch()
    l_eager, m_eager, g_eager = loss_and_grads(task, batch)
    torch._dynamo.reset()
    task.wrap(torch.compile(task.model, backend="aot_eager", fullgraph=True),
              {"target": torch.compile(vq.tokenize, backend="aot_eager", fullgraph=True)})
    l_comp, m_comp, g_comp = loss_and_grads(task, batch)
    assert torch.allclose(l_eager, l_comp, atol=1e-4)
    for k in m_eager:
        assert torch.allclose(m_eager[k], m_comp[k], atol=1e-4), k
    for n in g_eager:
        assert torch.allclose(g_eager[n], g_comp[n], atol=1e-5, rtol=1e-4), n
    torch._dynamo.reset()


def test_short_cpu_attention_is_explicit_in_cpu_training_with_the_same_loss_and_grads(tmp_path):
    """The Trainer on a CPU switches the trained network's attention to timm's explicit form when its ViTs see fewer
    than 128 tokens (SDPA's math kernel upcasts and costs more there; a compiled graph would get the flash kernel,
    slow to differentiate), leaves the frozen helpers and longer sequences on SDPA, and the step's loss and gradients
    stay those of the SDPA path."""
    from timm.models.beit import Attention

    from beitv2.models.backbone import BEiTViT, unfuse_short_cpu_attention

    mim, vq = tiny_parts()
    task = MIMTask(mim, TokenTarget(vq)).train()
    batch = mim_batch()
    l_sdpa, _, g_sdpa = loss_and_grads(task, batch)
    assert sum(isinstance(m, Attention) and m.fused_attn for m in mim.modules()) == 3  # 2 blocks + 1 head block
    trainer = mim_trainer(tmp_path / "run")
    assert trainer.fit().status == "finished"
    trained, frozen = trainer.task.model, trainer.task.target.tokenizer
    assert not any(m.fused_attn for m in trained.modules() if isinstance(m, Attention))
    assert all(m.fused_attn for m in frozen.modules() if isinstance(m, Attention))
    assert unfuse_short_cpu_attention(mim) == 3
    l_exp, _, g_exp = loss_and_grads(task, batch)
    assert torch.allclose(l_sdpa, l_exp, atol=1e-5)
    for n in g_sdpa:
        assert torch.allclose(g_sdpa[n], g_exp[n], atol=1e-6, rtol=1e-4), n
    long = BEiTViT(ViTConfig(img_size=(224,), patch_size=16, embed_dim=32, depth=1, num_heads=2))  # 197 tokens
    assert unfuse_short_cpu_attention(long) == 0
    assert all(m.fused_attn for m in long.modules() if isinstance(m, Attention))


def test_bf16_autocast_traces_without_a_graph_break():
    """A compiled teacher forward enters `bf16_autocast`, which asks whether the CPU computes bf16 natively: the
    answer must be readable by Dynamo without a graph break (a `functools.cache` probe broke every teacher graph)."""
    from beitv2.engine.precision import bf16_autocast, cpu_bf16_native

    cpu_bf16_native()  # probed once, as the trainer does before compiling

    def f(x):
        with bf16_autocast(x.device):
            return (x @ x).float().sum()

    x = torch.randn(8, 8)
    assert torch.compile(f, fullgraph=True, backend="eager")(x).item() == pytest.approx(f(x).item())


def test_quantizer_training_forward_traces_without_a_graph_break():
    """The training forward branches on whether the codebook is initialised: read from the device, that was a
    `.item()` graph break splitting every compiled tokenizer step into five graphs. It is a host flag now, set by
    construction, the k-means initialisation and `load_state_dict`."""
    q = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=False)).train()
    z = F.normalize(torch.randn(2, 6, 4), dim=-1)
    explained = torch._dynamo.explain(q)(z)
    assert explained.graph_break_count == 0, explained.break_reasons
    trained = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=True, kmeans_iters=2)).train()
    trained(z)  # k-means on the first batch
    fresh = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=True))
    assert not fresh._initted_on_host()
    fresh.load_state_dict(trained.state_dict())  # an initialised codebook: no second k-means after loading
    assert fresh._initted_on_host()
    blank = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=True))
    blank.mark_initted()  # as the official-checkpoint loader does: the training forward must not run k-means
    blank._kmeans_init = lambda flat: pytest.fail("k-means re-initialised a codebook marked initialised")
    blank.train()(z)
    assert blank._initted_on_host() and bool(blank.embedding.initted)


def test_rel_pos_bias_op_matches_timm_in_values_and_gradient():
    """The shared relative position bias as one opaque op (so Inductor does not inline its gather into every
    softmax): the same bias and table gradient as timm's `RelativePositionBias`, and a valid custom op."""
    from timm.models.beit import RelativePositionBias

    from beitv2.models.relpos import rel_pos_bias

    m = RelativePositionBias((3, 4), 2)
    torch.nn.init.normal_(m.relative_position_bias_table)
    table, index, n = m.relative_position_bias_table, m.relative_position_index, m.window_area + 1
    ours = rel_pos_bias(table, index, n)
    assert ours.shape == (2, 13, 13) and torch.equal(ours, m())
    w = torch.randn_like(ours)
    g_timm = torch.autograd.grad((m() * w).sum(), table)[0]
    g_ours = torch.autograd.grad((rel_pos_bias(table, index, n) * w).sum(), table)[0]
    assert torch.allclose(g_ours, g_timm, atol=1e-6)
    torch.library.opcheck(rel_pos_bias, (table, index, n))


def test_compiled_cpu_training_uses_explicit_attention_at_every_length():
    """Compiled on a CPU, a ViT at 197 tokens switches to the explicit form too (the flash backward was the largest
    cost of the compiled ViT-B tokenizer step); eager it keeps SDPA."""
    from timm.models.beit import Attention

    from beitv2.models.backbone import BEiTViT, unfuse_short_cpu_attention

    long = BEiTViT(ViTConfig(img_size=(224,), patch_size=16, embed_dim=32, depth=2, num_heads=2))
    assert unfuse_short_cpu_attention(long) == 0
    assert unfuse_short_cpu_attention(long, compiled=True) == 2
    assert not any(m.fused_attn for m in long.modules() if isinstance(m, Attention))


def test_a_failing_compile_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    """No working C++ compiler for Inductor: the run warns and trains eagerly, with the eager run's result."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    torch._dynamo.reset()
    seed_everything(0)
    eager = mim_trainer(tmp_path / "eager", data=MIMBlobs(4), compile=False, log_every_steps=1)
    eager.fit()
    seed_everything(0)
    tr = mim_trainer(tmp_path / "compiled", data=MIMBlobs(4), compile=True, log_every_steps=1)
    with caplog.at_level("WARNING", logger="beitv2.engine"):
        res = tr.fit()
    torch._dynamo.reset()
    assert res.status == "finished" and not tr.compiled and tr.net is tr.eager_net
    assert "torch.compile failed" in caplog.text
    for p, q in zip(eager.task.model.parameters(), tr.task.model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------- quantizer statistics

def test_count_codes_equals_bincount_and_stays_on_device():
    q = NormEMAQuantizer(QuantizerConfig(num_codes=10, code_dim=4, kmeans_init=False))
    idx = torch.tensor([[0, 3, 3], [9, 3, 0]])
    counts = q.count_codes(idx)
    assert counts.shape == (10,) and counts.dtype == torch.float32
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=10).float())


def test_quantizer_reads_initted_once_and_again_after_loading():
    q = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=True, kmeans_iters=2)).train()
    q(torch.randn(2, 8, 4))  # k-means init on the first batch
    assert bool(q.embedding.initted) and q._initted_seen
    fresh = NormEMAQuantizer(QuantizerConfig(num_codes=8, code_dim=4, kmeans_init=True))
    q.load_state_dict(fresh.state_dict())  # an un-initialised codebook: the next training forward must re-init
    assert not q._initted_seen
    q(torch.randn(2, 8, 4))
    assert bool(q.embedding.initted)


def test_vqkd_batch_perplexity_without_boolean_indexing():
    _, vq = tiny_parts()
    vq.train()
    loss, metrics = vq(torch.rand(2, 3, 16, 16), torch.randn(2, 16, 8))
    used = metrics["batch_codes_used"]
    assert 1 <= float(used) <= 16 and 1 <= float(metrics["batch_perplexity"]) <= float(used) + 1e-4


# ----------------------------------------------------------------------------------- metrics read at check points

class MIMBlobs(Dataset):
    def __init__(self, n: int = 16, nan_at: int | None = None):
        self.items = [mim_batch(1, seed=i) for i in range(n)]
        if nan_at is not None:
            self.items[nan_at]["image"][:] = float("nan")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.items[i].items()}


def mim_trainer(out: Path, data: Dataset | None = None, optimizer=None, **kw) -> Trainer:
    mim, vq = tiny_parts()
    cfg = TrainConfig(output_dir=str(out), epochs=1, batch_size=2, precision="fp32", progress=False,
                      tensorboard=False, **kw)
    return Trainer(MIMTask(mim, TokenTarget(vq)), data or MIMBlobs(), cfg, OptimConfig(lr=1e-3, warmup_epochs=0),
                   dist=init_distributed("cpu"), optimizer=optimizer)


def step_records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["type"] == "step"}


def test_metrics_are_read_only_at_check_points_and_equal_the_per_step_ones(tmp_path):
    seed_everything(0)
    every = mim_trainer(tmp_path / "every", log_every_steps=1)
    every.fit()
    seed_everything(0)
    sparse = mim_trainer(tmp_path / "sparse", log_every_steps=3)
    reads = []
    check = sparse._check

    def spy(acc, *a):
        reads.append(sparse.global_step)
        assert torch.is_tensor(acc.last) and acc.last.device.type == "cpu"  # the step left its metrics on the device
        return check(acc, *a)

    sparse._check = spy
    res = sparse.fit()
    assert res.status == "finished" and res.global_step == 8
    assert reads == [1, 3, 6, 8]  # the first step, every 3rd, the epoch's last: no read in between
    a, b = step_records(tmp_path / "every"), step_records(tmp_path / "sparse")
    assert sorted(b) == [1, 3, 6]
    for s in b:
        for k in ("loss", "loss_1", "loss_2", "mlm_acc_1", "grad_norm"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-6), (s, k)
    epoch_a = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()][-1]
    epoch_b = [json.loads(x) for x in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch_a["type"] == epoch_b["type"] == "epoch"
    assert epoch_b["loss"] == pytest.approx(epoch_a["loss"], rel=1e-6)
    assert res.last_metrics["loss"] == pytest.approx(a[8]["loss"], rel=1e-6)


def test_stop_checks_add_check_points_without_log_lines(tmp_path):
    seed_everything(0)
    tr = mim_trainer(tmp_path, log_every_steps=100, stop_check_every_steps=3)
    reads = []
    check = tr._check
    tr._check = lambda *a: (reads.append(tr.global_step), check(*a))[1]
    assert tr.fit().status == "finished"
    assert reads == [1, 3, 6, 8]  # the first step, every 3rd (stop checks), the epoch's end
    assert sorted(step_records(tmp_path)) == [1]  # log lines only where log_every_steps says


def test_non_finite_step_is_skipped_on_device_and_reported_at_the_check(tmp_path):
    seed_everything(0)
    tr = mim_trainer(tmp_path, data=MIMBlobs(16, nan_at=4), log_every_steps=100, save_every_steps=100)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ ") as err:
        tr.fit()
    assert "seen at the check after step 8" in str(err.value)  # the epoch's end: no check before
    assert S.list_checkpoints(tmp_path) == []
    assert all(torch.isfinite(p).all() for p in tr.task.model.parameters())  # the bad step was not applied


def test_an_optimizer_that_cannot_skip_on_the_device_adds_no_per_step_read(tmp_path):
    """PyTorch's for-loop AdamW takes no ``found_inf``: it applies the non-finite step, yet the host still reads
    nothing before the next check point, which raises before any checkpoint is written and says what happened."""
    seed_everything(0)
    tr = mim_trainer(tmp_path, data=MIMBlobs(16, nan_at=4), log_every_steps=3, save_every_steps=3,
                     optimizer=lambda model, cfg: build_optimizer(model, cfg, fused=False))
    assert not tr.step_skips_on_device
    reads = []
    check = tr._check
    tr._check = lambda *a: (reads.append(tr.global_step), check(*a))[1]
    with pytest.raises(NonFiniteLossError, match="cannot skip a step on the device") as err:
        tr.fit()
    bad = int(str(err.value).split("at step ")[1].split()[0])  # 0-based: checked after global step bad + 1
    checks = [1, 3, 6, 8]  # the first step, every 3rd, the epoch's end
    raised_at = min(c for c in checks if c > bad)
    assert reads == [c for c in checks if c <= raised_at]  # check points only, up to the one that raised
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [c for c in (3, 6) if c < raised_at]


def test_linear_probe_sgd_is_fused_and_skips_on_the_device():
    from beitv2.eval.linprobe import sgd_optimizer

    opt = sgd_optimizer(tiny_parts()[0], OptimConfig(lr=0.1))
    assert opt.defaults["fused"] and opt._step_supports_amp_scaling


# ----------------------------------------------------------------------------------------------------- data loading

def test_persistent_workers_make_each_epochs_samples(tmp_path):
    """With (epoch, index) keys, persistent workers give the same samples as a fresh set-up per epoch."""
    from torch.utils.data import DataLoader

    from beitv2.data import MIMDataset, TwoViewTransform
    from beitv2.engine.sampler import ResumableSampler

    class Images(Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            from PIL import Image
            return Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)), i % 2

    ds = MIMDataset(Images(), TwoViewTransform(16, 16), build_mask_generator("block", (4, 4), 6, 2), seed=3)
    assert ds.epoch_indexable
    sampler = ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, with_epoch=True)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=1, persistent_workers=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        got = list(loader)
        ds.set_epoch(epoch)  # the reference: this process's copy, told the epoch
        ref = [ds[int(i)] for b in got for i in b["index"]]
        images = torch.cat([b["image"] for b in got])
        assert torch.equal(images, torch.stack([r["image"] for r in ref]))
        assert torch.equal(torch.cat([b["mask_index"] for b in got]), torch.stack([r["mask_index"] for r in ref]))


def test_default_num_workers_follows_the_cpus(monkeypatch):
    from beitv2.data import DataConfig
    from beitv2.data.datasets import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(9)))
    assert default_num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 1
    assert DataConfig().num_workers == 1 and DataConfig(num_workers=3).num_workers == 3
