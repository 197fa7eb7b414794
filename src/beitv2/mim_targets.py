"""Pre-training targets: what the masked patches are labelled with and how the predictions are scored.

One interface, `MIMTarget`, three targets (``model.target``):

* ``tokens`` (`TokenTarget`): the frozen tokenizer's codes of the second view (BEiT v2 with VQ-KD, BEiT v1 with a
  dVAE), cross-entropy, ``mlm_acc`` per head.
* ``pixels`` (`PixelTarget`): the masked patches of the model's own input view, normalised per patch when
  ``model.norm_pix_loss`` (MAE's target; BEiT v1 §3.3 "pixel regression" ablation), MSE.
* ``features`` (`FeatureTarget`): the frozen teacher's patch features of the second view, ``1 - cosine`` (BEiT v2
  Table 6's "teacher features instead of VQ-KD codes" comparison; MVP/MaskFeat style), ``target_cos`` logged.

A target maps one view of the batch to targets for every patch (`MIMTarget.per_patch`, row-major), `at_masked` keeps
the masked ones in the order of the model's outputs, and `MIMTarget.score` sums its loss over the model's heads (with
patch aggregation both heads predict the same targets). The model is the same `BEiTv2ForMIM` for all three; only its
head width follows ``model.target`` (`MIMConfig.out_dim`, part of the saved config so a file rebuilds alone).
`build_target` makes the target of a ``beitv2 pretrain`` config, `tasks.MIMTask` trains against it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, reading
from .models.mim import MIMConfig, gather_tokens, pixel_targets
from .teachers import Teacher, build_teacher
from .utils.sizes import to_2tuple


def at_masked(per_patch: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Targets [B, N] or [B, N, D] at the masked positions -> [M] or [M, D], in the order of the model's outputs.

    ``mask`` is the boolean [B, N] mask; ``index`` [B, M] (each row's masked positions, ascending; the data's
    ``mask_index``) picks the same entries by a gather of static shape, as the model does with it."""
    if index is None:
        return per_patch[mask]
    if per_patch.dim() == 2:
        return per_patch.gather(1, index).flatten()
    return gather_tokens(per_patch, index)


class MIMTarget(nn.Module):
    """Base. A subclass sets ``name`` (its ``model.target``), ``view`` (the batch key of the images it labels),
    ``second_size`` (the second view's (H, W), which `TwoViewTransform` makes as ``tokenizer_image``) and
    ``description``, and implements `per_patch` and `head_loss`.

    Frozen parts (a tokenizer, a teacher) are submodules: the task keeps them in eval mode without gradients, outside
    DDP and outside the checkpoint. ``frozen_net`` says whether `per_patch` runs one, so the trainer compiles it beside
    the model (`tasks.TrainTask.helper_fns`).
    """

    name = ""
    view = "tokenizer_image"
    frozen_net = False

    def __init__(self, second_size: int | tuple[int, int], description: str):
        super().__init__()
        self.second_size = to_2tuple(second_size)
        self.description = description

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        """Targets of every patch of ``batch[self.view]``, [B, N] (ids) or [B, N, D], row-major; called without
        gradients."""
        raise NotImplementedError

    @staticmethod
    def head_loss(out: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one head's float predictions [M, out_dim] and that head's metrics (without the head number)."""
        raise NotImplementedError

    @classmethod
    def score(cls, outputs: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum of the per-head losses; metrics ``<name>_<head>`` and ``loss_<head>`` (heads from 1). A class method:
        scoring needs no frozen part (``TokenTarget.score(model(images, mask), codes[mask])``)."""
        metrics: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, out in enumerate(outputs, start=1):
            loss, head_metrics = cls.head_loss(out.float(), labels)
            metrics.update({f"{k}_{i}": v for k, v in head_metrics.items()})
            metrics[f"loss_{i}"] = loss.detach()
            total = total + loss
        return total, metrics


class TokenTarget(MIMTarget):
    """The frozen tokenizer's codes of the second view (``batch['tokenizer_image']``, [0, 1]); cross-entropy."""

    name = "tokens"
    frozen_net = True

    def __init__(self, tokenizer: nn.Module, description: str = "tokenizer"):
        super().__init__(tokenizer.img_size, description)
        self.tokenizer = tokenizer

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.tokenize(images)

    @staticmethod
    def head_loss(out, labels):
        return F.cross_entropy(out, labels), {"mlm_acc": (out.argmax(-1) == labels).float().mean().detach()}


class PixelTarget(MIMTarget):
    """The (per-patch normalised) pixels of the model's own view, ``batch['image']``; MSE.

    Reads patch size and ``norm_pix_loss`` from the model's `MIMConfig` at every call (the config object is shared,
    so the model and its target cannot disagree)."""

    name = "pixels"
    view = "image"

    def __init__(self, mim_cfg: MIMConfig):
        super().__init__(mim_cfg.backbone.img_hw, "normalised-pixel targets")
        self.mim_cfg = mim_cfg

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_targets(images, self.mim_cfg.backbone.patch_size, self.mim_cfg.norm_pix_loss)

    @staticmethod
    def head_loss(out, labels):
        return F.mse_loss(out, labels.float()), {}


class FeatureTarget(MIMTarget):
    """The frozen teacher's features of the second view (``batch['tokenizer_image']``, [0, 1]); ``1 - cosine``.
    The teacher resamples its feature map to the model's patch grid, so any teacher fits."""

    name = "features"
    frozen_net = True

    def __init__(self, teacher: Teacher, description: str = "teacher features"):
        super().__init__(teacher.input_size, description)
        self.teacher = teacher

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    @staticmethod
    def head_loss(out, labels):
        return (1.0 - F.cosine_similarity(out, labels.float(), dim=-1)).mean(), {}

    @classmethod
    def score(cls, outputs, labels):
        loss, metrics = super().score(outputs, labels)
        with torch.no_grad():  # cosine of the first head, the quantity the loss maximises
            metrics["target_cos"] = torch.cosine_similarity(outputs[0].float(), labels.float(), dim=-1).mean()
        return loss, metrics


TARGETS = ("tokens", "pixels", "features")


def build_target(cfg: Any) -> MIMTarget:
    """The target of a ``beitv2 pretrain`` config (its ``model``, ``tokenizer`` and ``teacher`` sections), with its
    frozen part loaded; built before the MIM model (a teacher's construction may draw random numbers).

    A tokenizer is read from ``tokenizer.checkpoint`` (`PretrainConfig.validate` has checked its grid and vocabulary
    against the model); a teacher's width must equal ``model.target_dim``."""
    m = cfg.model
    if m.target == "tokens":
        with reading("tokenizer.checkpoint"):
            tokenizer, kind = cfg.tokenizer.load()
        return TokenTarget(tokenizer, f"{kind} tokenizer {cfg.tokenizer.checkpoint}")
    if m.target == "pixels":
        return PixelTarget(m)
    if m.target != "features":
        raise ConfigError(f"model.target: no target {m.target!r} ({', '.join(TARGETS)})")
    t = cfg.teacher
    teacher = build_teacher(t, m.backbone.grid_size)
    if teacher.feature_dim != m.target_dim:
        raise ConfigError(f"model.target_dim: {m.target_dim} differs from the teacher's feature width "
                          f"{teacher.feature_dim}; set --model.target_dim {teacher.feature_dim}")
    return FeatureTarget(teacher, f"{t.kind} teacher {t.name_or_path} features ({teacher.feature_dim}-d)")
