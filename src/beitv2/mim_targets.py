"""Pre-training targets: what labels the masked patches of a batch.

One interface, `MIMTarget`, three targets (``model.target``):

* ``tokens`` (`TokenTarget`): the frozen tokenizer's codes of the second view (BEiT v2 with VQ-KD, BEiT v1 with a
  dVAE).
* ``pixels`` (`PixelTarget`): the patches of the model's own input view, normalised per patch when
  ``model.norm_pix_loss`` (MAE's target; BEiT v1 §3.3 "pixel regression" ablation).
* ``features`` (`FeatureTarget`): the frozen teacher's patch features of the second view (BEiT v2 Table 6's
  "teacher features instead of VQ-KD codes" comparison; MVP/MaskFeat style).

A target maps one view of the batch to targets for every patch (`MIMTarget.per_patch`, row-major). The model picks
the masked ones and scores them (`BEiTv2ForMIM.loss`: cross-entropy, MSE or ``1 - cosine`` by ``model.target``); the
model is the same `BEiTv2ForMIM` for all three, only its head width follows ``model.target`` (`MIMConfig.out_dim`,
part of the saved config so a file rebuilds alone). `build_target` makes the target of a ``beitv2 pretrain`` config,
`tasks.MIMTask` trains against it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ConfigError, reading
from .models.mim import MIMConfig, pixel_targets
from .teachers import Teacher, build_teacher
from .utils.sizes import to_2tuple


class MIMTarget(nn.Module):
    """Base. A subclass sets ``name`` (its ``model.target``), ``view`` (the batch key of the images it labels),
    ``second_size`` (the second view's (H, W), which `TwoViewTransform` makes as ``tokenizer_image``) and
    ``description``, and implements `per_patch`.

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


class TokenTarget(MIMTarget):
    """The frozen tokenizer's codes of the second view (``batch['tokenizer_image']``, [0, 1])."""

    name = "tokens"
    frozen_net = True

    def __init__(self, tokenizer: nn.Module, description: str = "tokenizer"):
        super().__init__(tokenizer.img_size, description)
        self.tokenizer = tokenizer

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.tokenize(images)


class PixelTarget(MIMTarget):
    """The (per-patch normalised) pixels of the model's own view, ``batch['image']``.

    Reads patch size and ``norm_pix_loss`` from the model's `MIMConfig` at every call (the config object is shared,
    so the model and its target cannot disagree)."""

    name = "pixels"
    view = "image"

    def __init__(self, config: MIMConfig):
        super().__init__(config.backbone.img_hw, "normalised-pixel targets")
        self.config = config

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_targets(images, self.config.backbone.patch_size, self.config.norm_pix_loss)


class FeatureTarget(MIMTarget):
    """The frozen teacher's features of the second view (``batch['tokenizer_image']``, [0, 1]). The teacher
    resamples its feature map to the model's patch grid, so any teacher fits."""

    name = "features"
    frozen_net = True

    def __init__(self, teacher: Teacher, description: str = "teacher features"):
        super().__init__(teacher.input_size, description)
        self.teacher = teacher

    def per_patch(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)


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
