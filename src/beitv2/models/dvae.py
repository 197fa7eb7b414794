"""BEiT v1's tokenizer: a discrete VAE over pixels with DALL-E's architecture, loaded or trained here.

BEiT v1 took its visual tokens from OpenAI's frozen DALL-E dVAE encoder (112 px input, downsample 8, 8192 codes,
``argmax`` of the encoder logits). `beitv2.interop.dalle` loads those released files into this model; it can also
train its own dVAE of the same shape: a ResNet-style conv encoder maps an image to logits over ``vocab_size`` codes at
every cell of a (H/d) x (W/d) grid, a Gumbel-softmax relaxation mixes codebook vectors, and a conv decoder maps them
back to pixels.

API (used by ``beitv2 train-tokenizer --tokenizer.type dvae`` and by MIM pre-training; keep it stable)::

    cfg = DVAEConfig(img_size=32, in_chans=1, downsample=4, vocab_size=512)   # or dvae_tiny(in_chans=1, ...)
    model = DiscreteVAE(cfg)
    loss, metrics = model(images01, step=step)   # training; metrics: loss rec_loss kl kl_weight temperature
                                                  #   codebook_usage perplexity (python floats)
    codes = model.tokenize(images01)             # LongTensor [B, N], row-major over the (h, w) grid, N = h*w
    images = model.decode(codes)                 # codes [B, N] or [B, h, w] -> images in [0, 1], [B, C, H, W]
    images = model.reconstruct(images01)         # decode(tokenize(x))
    model.vocab_size, model.img_size, model.grid_size, model.channels
    model.temperature_at(step), model.kl_weight_at(step)

Conventions:
* Inputs are float images in [0, 1], [B, C, H, W] with H and W multiples of ``downsample``. They are mapped to
  [-1, 1] (``pixel_map='symmetric'``, as VQ-KD does) or by DALL-E's ``map_pixels`` (``'dall-e'``,
  ``(1 - 2 eps) x + eps``) before the encoder.
* ``forward(x, step=s)`` anneals the temperature and warms up the KL weight by ``s``; ``temperature=`` overrides the
  schedule. With neither, the end-of-schedule values (``temp_end``, full ``kl_weight``) are used, so a training loop
  must pass ``step``.
* In ``train()`` mode the decoder sees soft Gumbel-softmax mixtures (``straight_through=True``: hard one-hot forward,
  soft backward). In ``eval()`` mode it sees the hard argmax codes, so the validation loss measures exactly the tokens
  that ``tokenize`` hands to MIM.
* The Gumbel-softmax, the KL and the losses run in fp32 even under bf16/fp16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check, opt

__all__ = [
    "DVAEConfig",
    "DiscreteVAE",
    "DVAE_ARCHITECTURES",
    "DVAE_ARCHITECTURE_FIELDS",
    "dvae_architecture",
    "dvae_tiny",
    "dvae_small",
    "dvae_dalle",
    "kl_to_uniform",
    "map_pixels",
    "unmap_pixels",
]


@dataclass
class DVAEConfig:
    """Discrete VAE tokenizer (BEiT v1). Defaults are the DALL-E dVAE shape BEiT v1 used (112 px, /8, 8192 codes)."""

    img_size: int = opt(112, "input image size (square); BEiT v1 fed the dVAE 112 px (--second_input_size)")
    in_chans: int = opt(3, "input channels (1 for grayscale)")
    downsample: int = opt(8, "encoder downsampling factor, a power of two; token grid = img_size / downsample")
    vocab_size: int = opt(8192, "number of codes")
    code_dim: int = opt(128, "codebook vector size (the decoder's input channels)")
    hidden_dim: int = opt(256, "width of the first encoder group; group g has hidden_dim * 2**g channels")
    blocks_per_group: int = opt(2, "residual blocks per resolution group (DALL-E: 2)")
    rec_loss: Literal["mse", "l1", "logit-laplace"] = opt(
        "mse", "reconstruction loss; 'logit-laplace' is DALL-E's NLL (decoder predicts location and log-scale)")
    pixel_map: Literal["symmetric", "dall-e"] = opt(
        "symmetric", "encoder input mapping of [0,1] pixels: 'symmetric' -> [-1,1], 'dall-e' -> map_pixels")
    logit_laplace_eps: float = opt(0.1, "eps of DALL-E's map_pixels (x -> (1-2eps) x + eps)")
    temp_start: float = opt(1.0, "Gumbel-softmax temperature at step 0")
    temp_end: float = opt(1.0 / 16, "temperature after temp_anneal_steps (DALL-E: 1/16)")
    temp_anneal_steps: int = opt(150_000, "steps to anneal temp_start -> temp_end (DALL-E: 150k); 0 = temp_end")
    temp_schedule: Literal["cosine", "exp", "constant"] = opt(
        "cosine", "temperature schedule: 'cosine' (DALL-E), 'exp' (geometric), 'constant' (temp_start)")
    straight_through: bool = opt(False, "hard one-hot codes in the forward pass, soft gradients (ST Gumbel)")
    kl_weight: float = opt(
        0.01, "weight of the KL to the uniform prior (nats per token vs a per-element rec loss); see docs/dvae.md")
    kl_warmup_steps: int = opt(5_000, "cosine warm-up of the KL weight from 0 (DALL-E: 5000 updates); 0 = none")
    decoder_stem: bool = opt(False, "a 1x1 conv from the code vectors to the decoder's first width before its blocks "
                                    "(dVAEs trained by earlier versions); False = DALL-E's decoder layout")

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.in_chans >= 1, f"{p}in_chans", f"must be >= 1, got {self.in_chans}")
        d = self.downsample
        check(d >= 2 and (d & (d - 1)) == 0, f"{p}downsample", f"must be a power of two >= 2, got {d}")
        check(self.img_size >= d and self.img_size % d == 0, f"{p}img_size",
              f"{self.img_size} is not a positive multiple of downsample {d}")
        check(self.vocab_size >= 2, f"{p}vocab_size", f"must be >= 2, got {self.vocab_size}")
        check(self.code_dim >= 1, f"{p}code_dim", f"must be >= 1, got {self.code_dim}")
        check(self.hidden_dim >= 4 and self.hidden_dim % 4 == 0, f"{p}hidden_dim",
              f"must be a positive multiple of 4 (blocks use width/4 inside), got {self.hidden_dim}")
        check(self.blocks_per_group >= 1, f"{p}blocks_per_group", f"must be >= 1, got {self.blocks_per_group}")
        check(self.rec_loss in ("mse", "l1", "logit-laplace"), f"{p}rec_loss",
              f"must be one of mse, l1, logit-laplace, got {self.rec_loss!r}")
        check(self.pixel_map in ("symmetric", "dall-e"), f"{p}pixel_map",
              f"must be 'symmetric' or 'dall-e', got {self.pixel_map!r}")
        check(0.0 < self.logit_laplace_eps < 0.5, f"{p}logit_laplace_eps",
              f"must be in (0, 0.5), got {self.logit_laplace_eps}")
        check(self.temp_start > 0, f"{p}temp_start", f"must be > 0, got {self.temp_start}")
        check(0 < self.temp_end <= self.temp_start, f"{p}temp_end",
              f"must be in (0, temp_start={self.temp_start}], got {self.temp_end}")
        check(self.temp_anneal_steps >= 0, f"{p}temp_anneal_steps", f"must be >= 0, got {self.temp_anneal_steps}")
        check(self.temp_schedule in ("cosine", "exp", "constant"), f"{p}temp_schedule",
              f"must be one of cosine, exp, constant, got {self.temp_schedule!r}")
        check(self.kl_weight >= 0, f"{p}kl_weight", f"must be >= 0, got {self.kl_weight}")
        check(self.kl_warmup_steps >= 0, f"{p}kl_warmup_steps", f"must be >= 0, got {self.kl_warmup_steps}")

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.img_size // self.downsample
        return g, g


# ---------------------------------------------------------------------------------------------- named architectures
DVAE_ARCHITECTURE_FIELDS: dict[str, dict] = {
    # CPU-sized: 28-32 px grayscale or RGB (set in_chans / img_size), 8x8 grid at 32 px.
    "dvae_tiny": dict(img_size=32, in_chans=3, downsample=4, vocab_size=512, code_dim=64, hidden_dim=32,
                      blocks_per_group=1, temp_anneal_steps=2_000, kl_warmup_steps=500),
    # One GPU, small images: 64 px -> 8x8 grid.
    "dvae_small": dict(img_size=64, in_chans=3, downsample=8, vocab_size=2048, code_dim=128, hidden_dim=64,
                       blocks_per_group=1, temp_anneal_steps=20_000, kl_warmup_steps=2_000),
    # DALL-E dVAE shape as used by BEiT v1: 112 px -> 14x14 grid of 8192 codes (the config defaults).
    "dvae_dalle": dict(img_size=112, in_chans=3, downsample=8, vocab_size=8192, code_dim=128, hidden_dim=256,
                       blocks_per_group=2, temp_anneal_steps=150_000, kl_warmup_steps=5_000),
}


def dvae_architecture(name: str, **overrides) -> DVAEConfig:
    """A validated `DVAEConfig` from an architecture name plus field overrides."""
    if name not in DVAE_ARCHITECTURE_FIELDS:
        raise KeyError(f"unknown dVAE architecture {name!r} (known: {', '.join(DVAE_ARCHITECTURE_FIELDS)})")
    cfg = DVAEConfig(**{**DVAE_ARCHITECTURE_FIELDS[name], **overrides})
    cfg.validate("tokenizer.dvae.")
    return cfg


def dvae_tiny(**overrides) -> DVAEConfig:
    return dvae_architecture("dvae_tiny", **overrides)


def dvae_small(**overrides) -> DVAEConfig:
    return dvae_architecture("dvae_small", **overrides)


def dvae_dalle(**overrides) -> DVAEConfig:
    return dvae_architecture("dvae_dalle", **overrides)


# name -> factory returning a fresh config (the form `beitv2.models.architectures.get_architecture` expects).
DVAE_ARCHITECTURES: dict[str, Callable[..., DVAEConfig]] = {
    "dvae_tiny": dvae_tiny,
    "dvae_small": dvae_small,
    "dvae_dalle": dvae_dalle,
}


# --------------------------------------------------------------------------------------------------- helpers
def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """DALL-E's squashing of [0,1] pixels into [eps, 1-eps], where the logit-Laplace density is finite."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over positions of KL(softmax(logits) || Uniform(K)) = sum_k q_k log q_k + log K, in nats, in fp32."""
    logq = F.log_softmax(logits.float(), dim=dim)
    return ((logq.exp() * logq).sum(dim) + math.log(logits.shape[dim])).mean()


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2)
    # DALL-E's init: N(0, 1/fan_in) weights, zero bias; the residual post-gain keeps the sum stable at depth.
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(cin * k * k))
    nn.init.zeros_(conv.bias)
    return conv


class EncoderBlock(nn.Module):
    """DALL-E-style bottleneck residual block: id + post_gain * (relu-conv3 x3 -> relu-conv1)."""

    def __init__(self, cin: int, cout: int, num_layers: int):
        super().__init__()
        hid = cout // 4
        self.id_path = _conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), _conv(cin, hid, 3), nn.ReLU(), _conv(hid, hid, 3),
            nn.ReLU(), _conv(hid, hid, 3), nn.ReLU(), _conv(hid, cout, 1),
        )
        self.post_gain = 1.0 / num_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """Mirror of `EncoderBlock`: relu-conv1 first (it narrows), then three relu-conv3."""

    def __init__(self, cin: int, cout: int, num_layers: int):
        super().__init__()
        hid = cout // 4
        self.id_path = _conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), _conv(cin, hid, 1), nn.ReLU(), _conv(hid, hid, 3),
            nn.ReLU(), _conv(hid, hid, 3), nn.ReLU(), _conv(hid, cout, 3),
        )
        self.post_gain = 1.0 / num_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group_widths(cfg: DVAEConfig) -> list[int]:
    num_groups = int(math.log2(cfg.downsample)) + 1  # one max-pool (or upsample) between consecutive groups
    return [cfg.hidden_dim * 2**g for g in range(num_groups)]


class Encoder(nn.Module):
    """conv7 -> groups of residual blocks with 2x max-pool between them -> relu -> conv1 to code logits."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = _group_widths(cfg)
        n = len(widths) * cfg.blocks_per_group
        layers: list[nn.Module] = [_conv(cfg.in_chans, widths[0], 7)]
        cin = widths[0]
        for g, w in enumerate(widths):
            if g > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(cfg.blocks_per_group):
                layers.append(EncoderBlock(cin, w, n))
                cin = w
        layers += [nn.ReLU(), _conv(cin, cfg.vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Groups of residual blocks over the code vectors with 2x nearest upsampling -> relu -> conv1 to pixels.

    DALL-E's layout: its decoder starts with a 1x1 convolution over the one-hot codes (here the codebook lookup)
    and the first block widens the code vectors itself (a 1x1 ``id_path``). ``decoder_stem`` adds a 1x1 convolution
    to the first group's width before the blocks instead (the layout of dVAEs trained by earlier versions)."""

    def __init__(self, cfg: DVAEConfig, out_chans: int):
        super().__init__()
        widths = _group_widths(cfg)[::-1]
        n = len(widths) * cfg.blocks_per_group
        layers: list[nn.Module] = [_conv(cfg.code_dim, widths[0], 1)] if cfg.decoder_stem else []
        cin = widths[0] if cfg.decoder_stem else cfg.code_dim
        for g, w in enumerate(widths):
            if g > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            for _ in range(cfg.blocks_per_group):
                layers.append(DecoderBlock(cin, w, n))
                cin = w
        layers += [nn.ReLU(), _conv(cin, out_chans, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


# --------------------------------------------------------------------------------------------------- model
class DiscreteVAE(nn.Module):
    """Gumbel-softmax discrete VAE; implements the tokenizer protocol (`tokenize`, `vocab_size`, `grid_size`)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        cfg.validate("tokenizer.dvae.")
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.img_size = cfg.img_size
        self.grid_size = cfg.grid_size
        self.channels = cfg.in_chans
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.codebook = nn.Embedding(cfg.vocab_size, cfg.code_dim)
        nn.init.normal_(self.codebook.weight, std=1.0)
        out = 2 * cfg.in_chans if cfg.rec_loss == "logit-laplace" else cfg.in_chans
        self.decoder = Decoder(cfg, out)

    # ---- schedules
    def temperature_at(self, step: int) -> float:
        c = self.config
        if c.temp_schedule == "constant":
            return c.temp_start
        if c.temp_anneal_steps == 0:
            return c.temp_end
        t = min(max(step, 0) / c.temp_anneal_steps, 1.0)
        if c.temp_schedule == "exp":
            return c.temp_start * (c.temp_end / c.temp_start) ** t
        return c.temp_end + (c.temp_start - c.temp_end) * 0.5 * (1 + math.cos(math.pi * t))

    def kl_weight_at(self, step: int) -> float:
        c = self.config
        if c.kl_warmup_steps == 0:
            return c.kl_weight
        t = min(max(step, 0) / c.kl_warmup_steps, 1.0)
        return c.kl_weight * 0.5 * (1 - math.cos(math.pi * t))

    # ---- pixel mappings
    def _map_input(self, images01: torch.Tensor) -> torch.Tensor:
        if self.config.pixel_map == "dall-e":
            return map_pixels(images01, self.config.logit_laplace_eps)
        return images01 * 2 - 1

    def _to_images(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> images in [0, 1] (fp32)."""
        out = out.float()
        c = self.config
        if c.rec_loss == "logit-laplace":
            return unmap_pixels(torch.sigmoid(out[:, : c.in_chans]), c.logit_laplace_eps)
        if c.pixel_map == "dall-e":
            return unmap_pixels(out, c.logit_laplace_eps)
        return ((out + 1) / 2).clamp(0, 1)

    def _rec_loss(self, out: torch.Tensor, images01: torch.Tensor) -> torch.Tensor:
        c = self.config
        out, x = out.float(), images01.float()
        if c.rec_loss == "logit-laplace":
            # NLL of y = map_pixels(x) under a logit-Laplace(mu, b): log(2 b y (1-y)) + |logit(y) - mu| / b.
            y = map_pixels(x, c.logit_laplace_eps)
            mu, log_b = out[:, : c.in_chans], out[:, c.in_chans:]
            log_density_jacobian = torch.log(y) + torch.log1p(-y)
            nll = math.log(2.0) + log_b + log_density_jacobian + (torch.logit(y) - mu).abs() * torch.exp(-log_b)
            return nll.mean()
        target = self._map_input(x)
        return F.mse_loss(out, target) if c.rec_loss == "mse" else F.l1_loss(out, target)

    def _check(self, images01: torch.Tensor) -> None:
        if images01.ndim != 4 or images01.shape[1] != self.channels:
            raise ValueError(f"dVAE expects images [B, {self.channels}, H, W] in [0, 1], got {tuple(images01.shape)}")
        h, w = images01.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"dVAE image size {h}x{w} is not a multiple of downsample {self.downsample}")

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Hard codes [B, h, w] -> code vectors [B, D, h, w] (a one-hot through the codebook)."""
        return self.codebook(codes).permute(0, 3, 1, 2)

    # ---- public API
    def encode_logits(self, images01: torch.Tensor) -> torch.Tensor:
        """Code logits [B, vocab_size, H/d, W/d]."""
        self._check(images01)
        return self.encoder(self._map_input(images01))

    def forward(self, images01: torch.Tensor, step: int | None = None,
                temperature: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if temperature is None:
            temperature = self.config.temp_end if step is None else self.temperature_at(step)
        kl_weight = self.config.kl_weight if step is None else self.kl_weight_at(step)
        logits = self.encode_logits(images01)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits32 = logits.float()
            codes = logits32.argmax(1)
            kl = kl_to_uniform(logits32)
            if self.training:
                soft = F.gumbel_softmax(logits32, tau=temperature, hard=self.config.straight_through, dim=1)
        if self.training:
            z = torch.einsum("bvhw,vd->bdhw", soft, self.codebook.weight)
        else:
            z = self._embed(codes)
        out = self.decoder(z)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            rec = self._rec_loss(out, images01)
            loss = rec + kl_weight * kl
        with torch.no_grad():
            counts = torch.bincount(codes.flatten(), minlength=self.vocab_size).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        metrics = {
            "loss": loss.item(),
            "rec_loss": rec.item(),
            "kl": kl.item(),
            "kl_weight": float(kl_weight),
            "temperature": float(temperature),
            "codebook_usage": (counts > 0).float().mean().item(),
            "perplexity": perplexity.item(),
        }
        return loss, metrics

    @torch.no_grad()
    def tokenize(self, images01: torch.Tensor) -> torch.Tensor:
        """Argmax codes, LongTensor [B, h*w] in row-major grid order (as the official `get_codebook_indices`)."""
        return self.encode_logits(images01).argmax(1).flatten(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] or [B, h, w] -> images [B, C, H, W] in [0, 1]. A [B, N] grid is taken as `grid_size` when
        N matches it, else as square."""
        codes = codes.long()
        if codes.ndim == 2:
            n = codes.shape[1]
            if n == self.grid_size[0] * self.grid_size[1]:
                h, w = self.grid_size
            else:
                h = w = math.isqrt(n)
                if h * w != n:
                    raise ValueError(f"cannot lay {n} codes on a grid: pass codes as [B, h, w]")
            codes = codes.view(-1, h, w)
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, N] or [B, h, w], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size})")
        return self._to_images(self.decoder(self._embed(codes)))

    @torch.no_grad()
    def reconstruct(self, images01: torch.Tensor) -> torch.Tensor:
        """decode(tokenize(x)) with the spatial layout of the input kept."""
        h, w = images01.shape[-2] // self.downsample, images01.shape[-1] // self.downsample
        return self.decode(self.tokenize(images01).view(-1, h, w))
