import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from beitv2.config import ConfigError
from beitv2.models.quantizer import NormEMAQuantizer, QuantizerConfig, kmeans_cosine


def _quantizer(codebook, decay=0.5, **kw):
    q = NormEMAQuantizer(QuantizerConfig(num_codes=codebook.shape[0], code_dim=codebook.shape[1], decay=decay,
                                         kmeans_init=False, **kw))
    q.embedding.weight.data.copy_(codebook)
    return q


def test_ema_update_matches_hand_computation():
    s = 2 ** -0.5
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = _quantizer(codebook, decay=0.5).train()
    # two vectors near code 0, one near code 1, none near code 2
    z = torch.tensor([[[1.0, 0.2], [1.0, -0.2], [0.1, 1.0]]])
    _, loss, idx = q(z)
    assert idx.tolist() == [[0, 0, 1]]
    u = F.normalize(z[0], dim=-1)
    # code 0: mean of two unit vectors is (u0+u1)/2 -> normalised -> (1, 0); EMA: normalise(0.5*(1,0)+0.5*(1,0))
    assert torch.allclose(q.codebook[0], torch.tensor([1.0, 0.0]), atol=1e-6)
    # code 1: target u2; new = normalise(0.5*(0,1) + 0.5*u2)
    expect1 = F.normalize(0.5 * torch.tensor([0.0, 1.0]) + 0.5 * u[2], dim=0)
    assert torch.allclose(q.codebook[1], expect1, atol=1e-6)
    # code 2 unused: unchanged
    assert torch.allclose(q.codebook[2], torch.tensor([-1.0, 0.0]))
    # EMA counts: 0.5*0 + 0.5*[2, 1, 0]
    assert torch.allclose(q.cluster_size, torch.tensor([1.0, 0.5, 0.0]))
    # commitment loss = mse(z_q, l2norm(z)) with the pre-update codes, beta = 1
    zq = codebook[[0, 0, 1]]
    assert torch.allclose(loss, F.mse_loss(zq, u), atol=1e-6)
    stats = q.usage_stats()
    assert stats["codes_used"] == 2 and stats["dead_codes"] == 1
    p = torch.tensor([2 / 3, 1 / 3])
    assert stats["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    del s


def test_eval_mode_leaves_codebook_alone():
    q = _quantizer(F.normalize(torch.randn(8, 4), dim=-1)).eval()
    before = q.codebook.clone()
    q(torch.randn(2, 5, 4))
    assert torch.equal(before, q.codebook)


def test_nearest_code_is_chosen_in_fp32_under_bf16_autocast():
    """Two codes whose cosines to z differ by ~1e-4 tie in bf16; the choice must not depend on autocast."""
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = F.normalize(torch.tensor([1.0, 0.02, 0.0, 0.0]), dim=0)
    z = F.normalize(torch.tensor([[1.0, 0.03, 0.0, 0.0]]), dim=-1)  # closer to b
    q = _quantizer(torch.stack([a, b])).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z @ torch.stack([a, b]).t()).argmax().item() == 0  # what a bf16 product would pick
        assert q.nearest(z).item() == 1


def test_straight_through_gradient():
    q = _quantizer(F.normalize(torch.randn(16, 4), dim=-1), beta=0.0).train()
    z = torch.randn(1, 6, 4, requires_grad=True)
    z_q, _, _ = q(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    # z_q = l2norm(z) + const, so dL/dz is the gradient through the l2 normalisation alone
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * g).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert z.grad.abs().sum() > 0


def test_kmeans_recovers_clusters_and_lazy_init():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 8), dim=-1)
    pts = F.normalize(centers.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 8), dim=-1)
    means, bins = kmeans_cosine(pts, 4, 10, torch.Generator().manual_seed(0))
    sims = (means @ centers.t()).max(dim=0).values
    assert sims.min() > 0.95 and bins.sum() == 200
    q = NormEMAQuantizer(QuantizerConfig(num_codes=4, code_dim=8, kmeans_init=True, decay=0.99))
    assert not bool(q.embedding.initted)
    q.train()(pts[None])
    assert bool(q.embedding.initted)
    assert (q.codebook @ centers.t()).max(dim=0).values.min() > 0.95


def test_kmeans_init_sets_the_ema_cluster_sizes_to_the_cluster_counts():
    """Official `kmeans` init copies the clusters' sizes into `cluster_size`; the first EMA update on the same vectors
    (d * bins + (1 - d) * bins) leaves them there."""
    torch.manual_seed(0)
    centers = torch.eye(8)[:4]  # orthogonal clusters of different sizes
    counts = torch.tensor([20, 40, 60, 80])
    pts = F.normalize(centers.repeat_interleave(counts, 0) + 0.05 * torch.randn(200, 8), dim=-1)
    q = NormEMAQuantizer(QuantizerConfig(num_codes=4, code_dim=8, kmeans_init=True, decay=0.9)).train()
    q(pts[None])
    code_of_center = (centers @ q.codebook.t()).argmax(dim=1)
    assert sorted(code_of_center.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(q.cluster_size[code_of_center], counts.float())


def test_dead_code_restart_reseeds_from_batch():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    q = _quantizer(codebook, decay=0.5, restart_threshold=0.2).train()
    z = F.normalize(torch.tensor([[[1.0, 0.1], [1.0, -0.1], [0.9, 0.3]]]), dim=-1)
    q(z)
    # codes 1-3 got no vectors: their EMA count 0 < 0.2, so they now sit on batch vectors
    for i in (1, 2, 3):
        assert (q.codebook[i] @ z[0].t()).max() > 0.999
    assert q.num_restarted == 3


def test_state_dict_round_trip(tmp_path):
    q = _quantizer(F.normalize(torch.randn(32, 8), dim=-1)).train()
    q(torch.randn(4, 10, 8))
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, tmp_path / "q.safetensors")
    q2 = NormEMAQuantizer(QuantizerConfig(num_codes=32, code_dim=8))
    q2.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert bool(q2.embedding.initted)
    z = torch.randn(3, 7, 8)
    assert torch.equal(q.eval()(z)[2], q2.eval()(z)[2])
    assert set(q.state_dict()) == {"embedding.weight", "embedding.initted", "cluster_size"}


def test_config_validation():
    with pytest.raises(ConfigError, match="decay"):
        QuantizerConfig(decay=1.5).validate()
    with pytest.raises(ConfigError, match="decay"):  # the quantizer checks the config it is given
        NormEMAQuantizer(QuantizerConfig(decay=1.5))


def _official_norm_ema_step(weight, cluster_size, z, decay):
    """One training step of the official `NormEMAVectorQuantizer`, written out in NumPy (float64) from its
    definition: nearest code by cosine, `ema_inplace` of the counts, then `norm_ema_inplace` of the codebook
    towards the normalised mean of the unit vectors assigned to each code (codes without vectors keep theirs)."""
    import numpy as np

    def l2n(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    z = l2n(z)
    idx = (z @ weight.T).argmax(axis=1)
    onehot = np.eye(weight.shape[0])[idx]
    bins = onehot.sum(0)
    cluster_size = decay * cluster_size + (1 - decay) * bins
    embed_sum = z.T @ onehot  # [D, K]
    safe = np.where(bins == 0, 1.0, bins)
    with np.errstate(invalid="ignore"):  # the rows of unused codes are 0 / 0 here and replaced just below
        e_new = l2n((embed_sum / safe).T)
    e_new[bins == 0] = weight[bins == 0]
    weight = l2n(decay * weight + (1 - decay) * e_new)
    return weight, cluster_size, idx


@pytest.mark.parametrize("decay", [0.8, 0.99])
def test_ema_steps_follow_the_official_norm_ema_update_with_an_asymmetric_decay(decay):
    """Several steps on random data against the official update: with a decay other than 0.5 the old statistics and
    the new ones weigh differently, so swapping `d` and `1 - d` (or dropping the re-normalisation) shows."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    codebook = F.normalize(torch.randn(12, 6, generator=g), dim=-1)
    q = _quantizer(codebook, decay=decay).train()
    weight, counts = codebook.double().numpy(), np.zeros(12)
    for step in range(4):
        z = torch.randn(2, 5, 6, generator=g) * (step + 1)  # any scale: the quantizer normalises
        weight, counts, idx = _official_norm_ema_step(weight, counts, z.reshape(-1, 6).double().numpy(), decay)
        _, _, got_idx = q(z)
        assert got_idx.reshape(-1).tolist() == idx.tolist()
        assert 1 < len(set(idx.tolist())) < 10  # codes shared by vectors, and unused codes: every branch runs
        np.testing.assert_allclose(q.codebook.double().numpy(), weight, atol=2e-6)
        np.testing.assert_allclose(q.cluster_size.double().numpy(), counts, rtol=1e-5, atol=1e-6)
    # the codebook moved away from where it started, by a step the decay sets
    assert not torch.allclose(q.codebook, codebook, atol=1e-3)


def test_ema_moves_a_code_by_one_minus_decay_towards_its_vectors():
    """By hand: code (1, 0) receives only the vector (0, 1); with decay 0.9 it becomes normalise((0.9, 0.1))."""
    q = _quantizer(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), decay=0.9).train()
    q(torch.tensor([[[0.2, 1.0]]]))  # nearer to code 0 (cos > 0) than to code 1
    u = F.normalize(torch.tensor([0.2, 1.0]), dim=0)
    expected = F.normalize(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * u, dim=0)
    torch.testing.assert_close(q.codebook[0], expected)
    torch.testing.assert_close(q.codebook[1], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(q.cluster_size, torch.tensor([0.1, 0.0]))  # 0.9 * 0 + 0.1 * 1


def test_dead_code_restart_counts_and_thresholds():
    """Codes whose EMA count (after this step's update) is below the threshold are re-seeded and start at the
    threshold; a code above it keeps its EMA value; restarted codes that stay unused are restarted again once their
    count decays below the threshold."""
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    q = _quantizer(codebook, decay=0.5, restart_threshold=0.3).train()
    z = F.normalize(torch.tensor([[[1.0, 0.1], [1.0, -0.1], [0.9, 0.3]]]), dim=-1)
    q(z)
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.5, 0.3, 0.3, 0.3]))  # 0.5 * 3, then the threshold
    assert q.num_restarted == 3
    u = z[0]
    torch.testing.assert_close(q.codebook[0], F.normalize(0.5 * codebook[0] + 0.5 * F.normalize(u.mean(0), dim=0),
                                                          dim=0))
    for i in (1, 2, 3):
        assert (q.codebook[i] @ u.t()).max() > 0.999
    # a batch at (0, -1): exactly one code takes it (restarted codes sit on the first batch, so near code 0's side);
    # whichever it is, the other codes' counts halve, and any falling below 0.3 is restarted again
    before = q.cluster_size.clone()
    far = torch.tensor([[[-1.0, 0.0]]])
    _, _, idx = q(far)
    bins = torch.zeros(4)
    bins[idx.item()] = 1.0
    ema = 0.5 * before + 0.5 * bins
    dead = ema < 0.3
    torch.testing.assert_close(q.cluster_size, torch.where(dead, torch.tensor(0.3), ema))
    assert q.num_restarted == 3 + int(dead.sum())
    assert int(dead.sum()) >= 2  # 0.5 * 0.3 = 0.15 for the restarted codes not chosen now


def test_eval_mode_decays_nothing():
    """Evaluation forwards leave the EMA counts, the codebook and the restart counter alone (the official eval pass
    only updates a usage statistic this port keeps in `usage_counts` through `record_usage`)."""
    q = _quantizer(F.normalize(torch.randn(8, 4), dim=-1), decay=0.9, restart_threshold=0.5).eval()
    q.cluster_size.fill_(2.0)
    q(torch.randn(2, 5, 4))
    assert torch.equal(q.cluster_size, torch.full((8,), 2.0)) and q.num_restarted == 0
