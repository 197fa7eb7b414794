"""VQ-KD's vector quantizer: l2-normalised codebook, cosine nearest code, straight-through, EMA codebook.

Follows the official `NormEMAVectorQuantizer`: codes are learned by an exponential moving average of the
normalised mean of the vectors assigned to them (decay 0.99, re-normalised after each update; codes with no assignment
keep their value), the only loss is the commitment term ``beta * mse(sg[z_q], z)``, and the codebook is initialised
lazily by cosine k-means on the first training batch.

Deliberate departures, each fixing a documented problem of the official code:
* k-means runs on the vectors of *all* ranks and its result is broadcast, so every rank starts with the same codebook
  (the official init is per-rank).
* Distances, k-means and EMA statistics run in fp32 even under autocast (the official code used fp16 there).
* Usage statistics are explicit: an EMA of counts (`cluster_size`, as in the official code), raw counts since the last
  `reset_usage()`, and `usage_stats()` giving codes used, dead codes and perplexity.
* Optional remedies for unused codes, all off by default (the paper's recipe); `use_whole_codebook` turns on the two
  that work best together:
  - a dead-code restart re-seeds codes whose EMA count per step falls below a threshold with encoder outputs of the
    current batch, drawn from all ranks' vectors by a seeded generator and broadcast, so every rank keeps the same
    codebook. `restart_threshold` compares the official EMA count (`cluster_size`, decay `decay`) with an absolute
    number. `restart_below` compares a faster EMA of the counts (decay `restart_decay`) with a fraction of the mean
    count per code, vectors per step / num_codes, which means the same at any codebook or batch size; the faster
    EMA matters because with decay 0.99 a code k-means gave a dozen vectors needs hundreds of steps to look dead;
  - a diversity term (`entropy_weight`): the mean entropy of each vector's soft assignment minus the entropy of the
    batch's mean assignment, softmax(cosine / `entropy_temperature`) over the codes, which pushes the encoder to
    spread its outputs over the codebook. Its gradient reaches the encoder only (the codebook is learned by EMA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check, opt
from ..utils.distributed import all_gather_cat, all_reduce_sum, broadcast

# What use_whole_codebook turns on: the remedy docs/models.md ("When codes go unused") measured best.
WHOLE_CODEBOOK = {"restart_below": 0.05, "entropy_weight": 0.02}


@dataclass
class QuantizerConfig:
    num_codes: int = opt(8192, "codebook size K")
    code_dim: int = opt(32, "code dimension D (the low-dimensional lookup space)")
    beta: float = opt(1.0, "commitment loss weight")
    decay: float = opt(0.99, "EMA decay of the codebook")
    kmeans_init: bool = opt(True, "initialise the codebook by cosine k-means on the first training batch")
    kmeans_iters: int = opt(10, "k-means iterations")
    restart_threshold: float = opt(0.0, "re-seed codes whose EMA usage count falls below this (0 = off, the paper)")
    restart_below: float = opt(0.0, "re-seed codes whose recent usage count (EMA with restart_decay) falls below "
                                    "this fraction of the mean count per code (vectors per step / num_codes), "
                                    "e.g. 0.05 (0 = off, the paper)")
    restart_decay: float = opt(0.9, "EMA decay of the recent usage counts restart_below reads")
    entropy_weight: float = opt(0.0, "weight of the codebook diversity loss (per-vector assignment entropy minus the "
                                     "entropy of the batch's mean assignment; 0 = off, the paper)")
    entropy_temperature: float = opt(0.01, "softmax temperature of the diversity loss's soft assignments (cosines)")
    use_whole_codebook: bool = opt(False, "the remedy for unused codes measured best on small data: restart_below "
                                          "0.05 and entropy_weight 0.02, each where it is 0 (off: the paper)")

    def resolved(self) -> QuantizerConfig:
        """The settings the quantizer runs with: ``use_whole_codebook`` fills in its two options where they are 0."""
        if not self.use_whole_codebook:
            return self
        return replace(self, **{k: getattr(self, k) or v for k, v in WHOLE_CODEBOOK.items()})

    def validate(self, prefix: str = "") -> None:
        check(self.num_codes >= 2, prefix + "num_codes", f"must be >= 2, got {self.num_codes}")
        check(self.code_dim >= 1, prefix + "code_dim", f"must be >= 1, got {self.code_dim}")
        check(0.0 <= self.decay < 1.0, prefix + "decay", f"must be in [0, 1), got {self.decay}")
        check(self.beta >= 0, prefix + "beta", "must be >= 0")
        check(self.kmeans_iters >= 0, prefix + "kmeans_iters", "must be >= 0")
        check(self.restart_threshold >= 0, prefix + "restart_threshold", "must be >= 0")
        check(self.restart_below >= 0, prefix + "restart_below", f"must be >= 0, got {self.restart_below}")
        check(0.0 <= self.restart_decay < 1.0, prefix + "restart_decay", f"must be in [0, 1), got {self.restart_decay}")
        check(self.entropy_weight >= 0, prefix + "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        check(self.entropy_temperature > 0, prefix + "entropy_temperature",
              f"must be > 0, got {self.entropy_temperature}")


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 matmuls in full precision inside (the trainer allows TF32 for the rest on CUDA)."""
    prev = torch.get_float32_matmul_precision()
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


@torch.compiler.disable
def _nearest_exact(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    with exact_fp32_matmul():
        return (z @ codebook.t()).argmax(dim=-1)


@torch.no_grad()
def kmeans_cosine(samples: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None,
                  chunk_bytes: int = 256 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on unit vectors. Returns (unit-norm means [k, D], cluster sizes [k]).

    Initial means are drawn without replacement when there are enough samples, else with replacement (official).
    Empty clusters keep their previous mean. Assignments are computed in row blocks of at most ``chunk_bytes`` of
    similarities, so the init on all ranks' vectors never holds an N_total x K matrix (8 ranks x 64 images x 196
    patches x 8192 codes would be 3.3 GB in fp32).
    """
    n = samples.shape[0]
    if n >= k:
        idx = torch.randperm(n, generator=generator, device="cpu")[:k]
    else:
        idx = torch.randint(0, n, (k,), generator=generator, device="cpu")
    means = samples[idx.to(samples.device)].clone()
    bins = torch.zeros(k, device=samples.device)
    rows = max(1, chunk_bytes // (4 * k))
    for _ in range(iters):
        assign = torch.cat([(samples[s:s + rows] @ means.t()).argmax(dim=-1) for s in range(0, n, rows)])
        bins = torch.bincount(assign, minlength=k).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        new = F.normalize(sums, dim=-1)
        means = torch.where((bins > 0)[:, None], new, means)
    return means, bins


def _mirror_initted(quantizer: NormEMAQuantizer, incompatible_keys) -> None:
    """Load-state-dict post hook (it runs after the children, so ``embedding.initted`` holds the loaded value)."""
    quantizer._initted_seen = bool(quantizer.embedding.initted)


class CodebookEmbedding(nn.Module):
    """Holds the codebook under the official key names (`quantize.embedding.weight`, `quantize.embedding.initted`)."""

    def __init__(self, num_codes: int, code_dim: int, initted: bool):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_codes, code_dim), dim=-1), requires_grad=False)
        self.register_buffer("initted", torch.tensor([initted]))


class NormEMAQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg = cfg.resolved()
        self.num_codes, self.code_dim = cfg.num_codes, cfg.code_dim
        self.embedding = CodebookEmbedding(cfg.num_codes, cfg.code_dim, initted=not cfg.kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(cfg.num_codes))  # EMA usage counts (official name)
        self.register_buffer("usage_counts", torch.zeros(cfg.num_codes, dtype=torch.float64), persistent=False)
        # restart_below's fast EMA of the counts; not saved (official key set), so every process starts it at the mean
        # count per code on its first training step, which leaves each code a few steps before it can look dead
        self.register_buffer("recent_counts", torch.zeros(cfg.num_codes), persistent=False)
        self._recent_started = False
        self.kmeans_seed = 0
        self.num_restarted = 0
        # host copy of embedding.initted: the training forward branches on it without reading the device (a sync,
        # and under torch.compile a graph break that splits the tokenizer's step into five graphs)
        self._initted_seen = not cfg.kmeans_init
        self.register_load_state_dict_post_hook(_mirror_initted)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def _initted_on_host(self) -> bool:
        """``embedding.initted`` as the host saw it last: at construction, after `load_state_dict` (read once
        there) and after the k-means initialisation."""
        return self._initted_seen

    def mark_initted(self) -> None:
        """Declare the codebook initialised (a loaded one must never be re-initialised by k-means), on the device
        and in the host copy the training forward reads."""
        self.embedding.initted.fill_(True)
        self._initted_seen = True

    # ---------------------------------------------------------------------------------------------- statistics
    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def usage_stats(self) -> dict[str, float]:
        """Codebook health over the vectors seen since `reset_usage()` (global under DDP when updated in training)."""
        counts = self.usage_counts.float()
        total = counts.sum().clamp_min(1)
        p = counts / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        used = int((counts > 0).sum())
        return {"codes_used": used, "dead_codes": self.num_codes - used, "usage": used / self.num_codes,
                "perplexity": float(entropy.exp()), "ema_dead_codes": int((self.cluster_size < 1e-3).sum()),
                "restarted": self.num_restarted}

    # -------------------------------------------------------------------------------------------------- core
    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        samples = all_gather_cat(z)
        gen = torch.Generator().manual_seed(self.kmeans_seed)
        means, bins = kmeans_cosine(samples, self.num_codes, self.config.kmeans_iters, gen)
        self.embedding.weight.data.copy_(broadcast(means.contiguous()))
        self.cluster_size.copy_(broadcast(bins.contiguous()))
        self.mark_initted()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by cosine similarity for unit vectors z [M, D], in exact fp32 even under autocast
        and with TF32 allowed for other matmuls (bf16 or TF32 similarities tie and flip between close codes; the
        product is small)."""
        with torch.autocast(z.device.type, enabled=False):
            if z.is_cuda:  # where TF32 exists: outside any compiled graph, which would bake TF32 in
                return _nearest_exact(z.float(), self.embedding.weight.float())
            return (z.float() @ self.embedding.weight.float().t()).argmax(dim=-1)

    def count_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """Assignments per code, float [num_codes], on ``idx``'s device. A scatter-add into a fixed-size vector:
        `torch.bincount` reads the largest index back to the host to size its output (a sync on CUDA)."""
        flat = idx.reshape(-1)
        return torch.zeros(self.num_codes, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat,
                                                                                                    dtype=torch.float))

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        bins = all_reduce_sum(self.count_codes(idx))
        sums = all_reduce_sum(torch.zeros(self.num_codes, self.code_dim, device=z.device).index_add_(0, idx, z))
        d = self.config.decay
        self.cluster_size.mul_(d).add_(bins, alpha=1 - d)
        self.usage_counts += bins.double()
        used = bins > 0
        target = torch.where(used[:, None], F.normalize(sums / bins.clamp_min(1)[:, None], dim=-1),
                             self.embedding.weight)
        self.embedding.weight.data.copy_(F.normalize(d * self.embedding.weight + (1 - d) * target, dim=-1))
        if self.config.restart_threshold > 0:
            self._restart(z, self.cluster_size < self.config.restart_threshold, self.cluster_size,
                          self.config.restart_threshold)
        if self.config.restart_below > 0:
            mean = bins.sum() / self.num_codes  # the mean count per code this step, all ranks' vectors
            if not self._recent_started:
                self.recent_counts.copy_(mean.expand(self.num_codes))
                self._recent_started = True
            self.recent_counts.mul_(self.config.restart_decay).add_(bins, alpha=1 - self.config.restart_decay)
            self._restart(z, self.recent_counts < self.config.restart_below * mean, self.recent_counts, mean)

    @torch.no_grad()
    def _restart(self, z: torch.Tensor, dead: torch.Tensor, counts: torch.Tensor, start: torch.Tensor | float
                 ) -> None:
        """Re-seed the ``dead`` codes with distinct vectors of all ranks' batch (drawn with replacement only when
        there are fewer vectors than dead codes) and set their ``counts`` to ``start``, so they are not restarted
        again at once. The decision reads all-reduced counts and the draw a generator seeded from the restart count,
        so every rank takes the same branch and picks the same rows; the broadcast keeps the codebooks bit-identical
        even so."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        samples = all_gather_cat(z)
        n = samples.shape[0]
        gen = torch.Generator().manual_seed(self.kmeans_seed + 1 + self.num_restarted)
        if n >= n_dead:
            pick = torch.randperm(n, generator=gen)[:n_dead]
        else:
            pick = torch.randint(0, n, (n_dead,), generator=gen)
        new = broadcast(samples[pick.to(samples.device)].contiguous())
        self.embedding.weight.data[dead] = new
        counts[dead] = torch.as_tensor(start, dtype=counts.dtype, device=counts.device)
        self.num_restarted += n_dead

    def diversity_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Mean entropy of each unit vector's soft assignment minus the entropy of the mean assignment (z [M, D],
        with gradient). Low when every vector picks one code confidently and the batch spreads over many codes; the
        mean is over this rank's vectors."""
        logits = z @ self.embedding.weight.detach().t() / self.config.entropy_temperature
        logp = F.log_softmax(logits, dim=-1)
        p = logp.exp()
        per_vector = -(p * logp).sum(-1).mean()
        mean_p = p.mean(0)
        batch = -torch.special.xlogy(mean_p, mean_p).sum()
        return per_vector - batch

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, N, D] (any scale) -> (straight-through z_q [B, N, D], commitment loss, code indices [B, N])."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            shape = z.shape
            z = F.normalize(z.float(), dim=-1)
            flat = z.reshape(-1, self.code_dim)
            if self.training and not self._initted_on_host():
                self._kmeans_init(flat.detach())
            idx = self.nearest(flat.detach())
            z_q = self.embedding.weight[idx].view(shape)
            loss = self.config.beta * F.mse_loss(z_q.detach(), z)
            if self.training and self.config.entropy_weight > 0:  # against the codebook the vectors were assigned by
                loss = loss + self.config.entropy_weight * self.diversity_loss(flat)
            if self.training:
                self._ema_update(flat.detach(), idx)
            z_q = z + (z_q - z).detach()
        return z_q, loss, idx.view(shape[:-1])

    @torch.no_grad()
    def record_usage(self, idx: torch.Tensor, reduce: bool = True) -> None:
        """Add the codes ``idx`` to the usage counts (evaluation passes; every rank must call it when reduce=True)."""
        counts = self.count_codes(idx)
        self.usage_counts += (all_reduce_sum(counts) if reduce else counts).double()

    @torch.no_grad()
    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding.weight[idx]
