"""VQ-KD: the BEiT v2 visual tokenizer, trained by distilling a teacher's patch features through a codebook.

    images [0,1] -> (x*2-1) -> encoder ViT -> fc_norm(patch tokens) -> Linear-Tanh-Linear (fp32) -> quantizer
    -> code grid -> decoder ViT (1x1 patch embedding, own CLS and positions) -> fc_norm -> Linear-Tanh-Linear
    -> loss = mean(1 - cos(decoder output, teacher features)) + commitment

Input convention (official `pre_process`): images are float tensors in [0, 1] (ToTensor output, no
normalisation); the model maps them to [-1, 1] itself. Teachers apply their own normalisation to the same [0,1] tensor.
Key names match the official checkpoints (`encoder.*`, `encode_task_layer.*`, `quantize.*`, `decoder.*`,
`decode_task_layer.*`). Non-square grids are supported (the official code assumed square).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check, opt
from .backbone import BEiTViT, ViTConfig
from .quantizer import NormEMAQuantizer, QuantizerConfig


def vqkd_encoder_config(**kw) -> ViTConfig:
    """Official VQ-KD ViT template: absolute positions, no layer scale, no relative bias, mean pooling (fc_norm).

    Initialised as the official fine-tuning ViT it is built from: untruncated trunc_normal(0.02) Linear weights and
    PyTorch's default init of the patch-embedding convolutions (the encoder's 16x16 and the decoder's 1x1 over the
    codes, which inherits this config)."""
    base = dict(init_values=0.0, use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False,
                use_mean_pooling=True, num_classes=0, init_trunc_sigmas=100.0, patch_embed_init="torch_default")
    base.update(kw)
    return ViTConfig(**base)


@dataclass
class VQKDConfig:
    encoder: ViTConfig = field(default_factory=vqkd_encoder_config, metadata={"help": "encoder ViT"})
    decoder_depth: int = opt(3, "decoder blocks (paper: 1 or 3)")
    decoder_embed_dim: int = opt(0, "decoder width (0 = encoder width)")
    decoder_num_heads: int = opt(0, "decoder heads (0 = encoder heads)")
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig, metadata={"help": "codebook"})
    teacher_dim: int = opt(512, "teacher feature width (CLIP ViT-B/16: 512, DINO ViT-B: 768)")
    input_norm: str = opt("default", "'default' maps [0,1] to [-1,1] (official); 'imagenet' uses ImageNet mean/std")

    def validate(self, prefix: str = "") -> None:
        check(self.decoder_depth >= 1, prefix + "decoder_depth", "must be >= 1")
        check(self.teacher_dim >= 1, prefix + "teacher_dim", "must be >= 1")
        check(self.input_norm in ("default", "imagenet"), prefix + "input_norm", "must be 'default' or 'imagenet'")
        check(self.encoder.use_mean_pooling, prefix + "encoder.use_mean_pooling",
              "VQ-KD reads fc_norm(patch tokens); keep mean pooling on")
        width = self.decoder_embed_dim or self.encoder.embed_dim
        heads = self.decoder_num_heads or self.encoder.num_heads
        check(width % heads == 0, prefix + "decoder_num_heads", f"decoder width {width} not divisible by {heads}")

    def decoder_config(self) -> ViTConfig:
        g = self.encoder.grid_size
        return replace(self.encoder, img_size=g, patch_size=1, in_chans=self.quantizer.code_dim,
                       embed_dim=self.decoder_embed_dim or self.encoder.embed_dim,
                       num_heads=self.decoder_num_heads or self.encoder.num_heads, depth=self.decoder_depth,
                       drop_path_rate=0.0)


def task_layer(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear-Tanh-Linear (official `encode_task_layer` / `decode_task_layer`)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


class VQKD(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = BEiTViT(cfg.encoder)
        dec_cfg = cfg.decoder_config()
        self.decoder = BEiTViT(dec_cfg)
        d = cfg.encoder.embed_dim
        self.encode_task_layer = task_layer(d, d, cfg.quantizer.code_dim)
        self.decode_task_layer = task_layer(dec_cfg.embed_dim, dec_cfg.embed_dim, cfg.teacher_dim)
        self.quantize = NormEMAQuantizer(cfg.quantizer)
        for layer in (self.encode_task_layer, self.decode_task_layer):
            for m in layer:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        self.grid_size = self.encoder.grid_size
        self.num_patches = self.encoder.num_patches
        self.img_size = cfg.encoder.img_hw
        self.patch_size = cfg.encoder.patch_size
        self.vocab_size = cfg.quantizer.num_codes
        self.teacher_dim = cfg.teacher_dim
        self.in_chans = cfg.encoder.in_chans
        mean = torch.tensor([0.485, 0.456, 0.406] if self.in_chans == 3 else [0.5] * self.in_chans)
        std = torch.tensor([0.229, 0.224, 0.225] if self.in_chans == 3 else [0.5] * self.in_chans)
        self.register_buffer("_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", std.view(1, -1, 1, 1), persistent=False)

    def pre_process(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.input_norm == "imagenet":
            return (images - self._mean) / self._std
        return images * 2.0 - 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous codes [B, N, code_dim] before quantisation (task layer in fp32, as in the official code)."""
        h = self.encoder.patch_features(self.pre_process(images))
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.encode_task_layer(h.float())

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, N, code_dim] -> predicted teacher features [B, N, teacher_dim]."""
        B, N, C = z_q.shape
        grid = z_q.transpose(1, 2).reshape(B, C, *self.grid_size)
        return self.decode_task_layer(self.decoder.patch_features(grid))

    def forward(self, images: torch.Tensor, teacher_features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training step: loss = mean(1 - cos(decoded, teacher)) + commitment; teacher_features [B, N, teacher_dim]."""
        if teacher_features.shape[:2] != (images.shape[0], self.num_patches):
            raise ValueError(f"teacher features {tuple(teacher_features.shape)} do not match the tokenizer grid "
                             f"{self.grid_size} ({self.num_patches} patches)")
        z_q, commit, idx = self.quantize(self.encode(images))
        out = self.decode(z_q)
        cos = F.cosine_similarity(out.float(), teacher_features.float(), dim=-1)
        rec = (1.0 - cos).mean()
        loss = rec + commit
        with torch.no_grad():
            counts = self.quantize.count_codes(idx)  # fixed-size, no host sync (unlike bincount / p[p > 0])
            p = counts / counts.sum()
            ppl = torch.exp(-torch.special.xlogy(p, p).sum())
        metrics = {"rec_loss": rec.detach(), "quant_loss": commit.detach(), "teacher_cos": cos.mean().detach(),
                   "batch_codes_used": (counts > 0).sum().float(), "batch_perplexity": ppl}
        return loss, metrics

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Code index per patch, LongTensor [B, N] in row-major patch order (official `get_codebook_indices`)."""
        z = F.normalize(self.encode(images).float(), dim=-1)
        return self.quantize.nearest(z.reshape(-1, z.shape[-1])).view(images.shape[0], -1)

    get_codebook_indices = tokenize

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-space features for code indices [B, N] (VQ-KD has no pixel decoder)."""
        return self.decode(self.quantize.lookup(codes))
