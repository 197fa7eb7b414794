"""Regression targets for masked image modeling: the papers' ablations beside the tokenizer codes of `MIMTask`.

* ``pixels`` (`PixelTargetTask`): the masked patches of the model's own input view, normalised per patch when
  ``model.norm_pix_loss`` (MAE's target; BEiT v1 §3.3 "pixel regression" ablation), MSE.
* ``features`` (`FeatureTargetTask`): the frozen teacher's patch features of the second view at the masked positions,
  ``1 - cosine`` (BEiT v2 Table 6's "teacher features instead of VQ-KD codes" comparison; MVP/MaskFeat style).

Both reuse `BEiTv2ForMIM` unchanged: its head width follows ``model.target`` (``patch_size**2 * in_chans`` for pixels,
``model.target_dim`` for features) and `BEiTv2ForMIM.loss` picks MSE or cosine. With patch aggregation on, both heads
regress the same targets and their losses are summed, as for codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .models.mim import pixel_targets
from .tasks import TrainTask
from .teachers import Teacher, TeacherConfig, build_teacher


class PixelTargetTask(TrainTask):
    """Regress the (per-patch normalised) pixels of the masked patches of ``batch['image']``."""

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        mask = batch["mask"].flatten(1).bool()
        cfg = self.model.mim_cfg
        with torch.no_grad():
            targets = pixel_targets(images, cfg.backbone.patch_size, cfg.norm_pix_loss)[mask]
        outputs = self.net(images, mask)
        return self.model.loss(outputs, targets)


class FeatureTargetTask(TrainTask):
    """Regress the frozen teacher's features of the second view (``batch['tokenizer_image']``, [0, 1]) at the masked
    patches. The teacher resamples its feature map to the model's patch grid, so any teacher fits."""

    frozen = ("teacher",)

    def __init__(self, mim_model: nn.Module, teacher: Teacher):
        super().__init__(mim_model)
        self.teacher = teacher
        self.freeze()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"].flatten(1).bool()
        with torch.no_grad():
            targets = self.teacher(batch["tokenizer_image"])[mask]
        outputs = self.net(batch["image"], mask)
        loss, metrics = self.model.loss(outputs, targets)
        with torch.no_grad():  # cosine of the first head, the quantity the loss maximises
            metrics["target_cos"] = torch.cosine_similarity(outputs[0].float(), targets.float(), dim=-1).mean()
        return loss, metrics


def regression_target(target: str, teacher_cfg: TeacherConfig, grid: tuple[int, int], img_hw: tuple[int, int],
                      target_dim: int) -> tuple[Callable[[nn.Module], TrainTask], tuple[int, int], str]:
    """For ``model.target`` pixels or features: (task factory taking the MIM model, second-view size, description).

    The teacher is built here, before the MIM model, and its width must equal ``model.target_dim``.
    """
    if target == "pixels":
        return PixelTargetTask, img_hw, "normalised-pixel targets"
    if target != "features":
        raise ConfigError(f"model.target: no regression target {target!r} (pixels or features)")
    teacher = build_teacher(teacher_cfg, grid)
    if teacher.feature_dim != target_dim:
        raise ConfigError(f"model.target_dim: {target_dim} differs from the teacher's feature width "
                          f"{teacher.feature_dim}; set --model.target_dim {teacher.feature_dim}")
    desc = f"{teacher_cfg.kind} teacher {teacher_cfg.name_or_path} features ({teacher.feature_dim}-d)"
    return (lambda model: FeatureTargetTask(model, teacher)), teacher.input_size, desc
