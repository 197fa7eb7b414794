"""What an exported model expects of its input images, and the check that an export computes what the model does.

A model fed other statistics, another size or another crop than it was trained with loses accuracy without any
error, so the timm and HF exports record the preprocessing of the model's own evaluation (`Preprocessing`):

* normalisation: the ``normalize`` a fine-tuned model file records (`beitv2 finetune` writes the one it trained
  with), else the run folder's ``aug.normalize`` (config.yaml beside the file), else ImageNet statistics (the
  official BEiT v2 convention); a VQ-KD encoder always has its own (2x - 1, or ImageNet with ``input_norm``);
* size, interpolation and crop: the model's input size; the run's ``aug.interpolation`` and ``aug.crop_pct`` (the
  shorter side resized to size / crop_pct, then a centre crop; 0 = the official rule, 0.875 below 384 px, else 1);
  a fine-tuning run's small-image rule (32 px or less) evaluates without resizing;
* channels: a 1-channel (grayscale) model is exported with a 3-channel input whose patch embedding computes the
  luma of the RGB input (`luma_patch_weight`), since the HF pipeline hands every image over as RGB and timm's
  transforms keep the image's mode. A gray image (R = G = B) then gives exactly the model's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.transforms import INTERPOLATIONS, EvalTransform, resolve_norm
from ..models.backbone import ViTConfig
from ..models.registry import backbone_config, backbone_state_dict, kind_of
from ..models.vqkd import VQKD
from ..utils.imaging import LUMA
from .hub import is_hub_ref

SMALL_IMAGE_MAX = 32  # the fine-tuning command's small-image rule: inputs this small are evaluated without a resize
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
PARITY_RTOL = 1e-4  # largest output difference an export may show, relative to the largest output


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation preprocessing of a model: [0, 255] image -> shorter side resized to ``resize_size`` with
    ``interpolation`` (unless ``resize`` is False), centre crop to ``img_hw``, [0, 1], then (x - mean) / std."""

    in_chans: int
    img_hw: tuple[int, int]
    normalize: str  # imagenet, inception, clip, none or vqkd (the tokenizer's own)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize: bool = True

    @property
    def resize_size(self) -> int:
        return round(max(self.img_hw) / self.crop_pct)

    def transform(self) -> Any:
        """This library's own evaluation transform for PIL images (`beitv2.data.transforms.EvalTransform`)."""
        norm = (self.mean, self.std) if self.mean is not None else "none"
        return EvalTransform(self.img_hw, resize_size=self.resize_size, interpolation_name=self.interpolation,
                             normalize=norm, channels=self.in_chans, resize=self.resize, output="float")

    def export_mean_std(self) -> tuple[list[float], list[float]] | None:
        """mean / std for the exported 3-channel input (a 1-channel model's statistics repeated)."""
        if self.mean is None or self.std is None:
            return None
        rep = 3 if self.in_chans == 1 else 1
        return list(self.mean) * rep, list(self.std) * rep

    def timm_crop_pct(self) -> float:
        """crop_pct for timm (which resizes to floor(size / crop_pct)) giving our round(size / crop_pct)."""
        if not self.resize:
            return 1.0  # timm always resizes: identical for images of the model's size, which the rule is for
        size, target = max(self.img_hw), self.resize_size
        c = size / target
        while math.floor(size / c) < target:  # float rounding may land just below the integer
            c = math.nextafter(c, 0.0)
        return c


def read_run_config(model_path: str | Path | None) -> dict:
    """The config.yaml of the run folder holding a model file (beside it, or one level up for ``best/``); {}."""
    import yaml


    if model_path is None or is_hub_ref(model_path):
        return {}
    path = Path(model_path)
    for folder in (path.parent, path.parent.parent):
        cfg_file = folder / "config.yaml"
        if cfg_file.is_file():
            try:
                cfg = yaml.safe_load(cfg_file.read_text())
            except (OSError, yaml.YAMLError):
                return {}
            return cfg if isinstance(cfg, dict) else {}
    return {}


def backbone_of(model: nn.Module) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of the exportable ViT of a model of any kind with a ViT backbone (a BEiTViT, the
    backbone of a BEiTv2ForMIM, a VQ-KD encoder; `beitv2.models.registry`)."""
    try:
        spec = kind_of(model)
    except TypeError:
        spec = None
    if spec is None or spec.backbone is None:
        raise TypeError(f"cannot export a {type(model).__name__}: it has no ViT backbone")
    state = {k: v.detach().cpu().contiguous() for k, v in backbone_state_dict(model).items()
             if not k.endswith("relative_position_index")}
    return backbone_config(model), state


def preprocessing_of(model: nn.Module, normalize: str | None = None, run_config: dict | None = None
                     ) -> Preprocessing:
    """The preprocessing ``model`` was trained and evaluated with (see the module docstring for the sources)."""
    cfg, _ = backbone_of(model)
    aug = (run_config or {}).get("aug") or {}
    hw = cfg.img_hw
    if isinstance(model, VQKD):
        name = "vqkd"
        if model.config.input_norm == "default":  # images * 2 - 1 == (images - 0.5) / 0.5
            norm: Any = ((0.5,) * cfg.in_chans, (0.5,) * cfg.in_chans)
        else:
            norm = (tuple(model._mean.flatten().tolist()), tuple(model._std.flatten().tolist()))
    else:
        run_norm = aug.get("normalize")
        name = normalize or (run_norm if run_norm not in (None, "auto") else "imagenet")
        norm = resolve_norm(name, cfg.in_chans)
    interp = str(aug.get("interpolation") or "bicubic")
    if interp not in INTERPOLATIONS:
        raise ValueError(f"the run's aug.interpolation {interp!r} is not one of {sorted(INTERPOLATIONS)}")
    crop = float(aug.get("crop_pct") or 0.0) or (0.875 if max(hw) < 384 else 1.0)
    resize = not (bool(aug.get("small_image_rule", False)) and max(hw) <= SMALL_IMAGE_MAX)
    return Preprocessing(in_chans=cfg.in_chans, img_hw=hw, normalize=name, mean=norm[0] if norm else None,
                         std=norm[1] if norm else None, interpolation=interp, crop_pct=crop, resize=resize)


def luma_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 1-channel patch-embedding weight [D, 1, p, p] as a 3-channel one reading the luma of RGB: for an input
    normalised with the same mean / std on every channel, sum_c LUMA_c (x_c - m) / s = (luma(x) - m) / s."""
    if weight.shape[1] != 1:
        raise ValueError(f"expected a 1-channel patch embedding, got {tuple(weight.shape)}")
    return torch.cat([weight * w for w in LUMA], dim=1)


def check_parity(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Refuse (ValueError) unless ``theirs`` equals ``ours`` within `PARITY_RTOL` of ours' largest magnitude."""
    if ours.shape != theirs.shape:
        raise ValueError(f"{what}: output shape {tuple(theirs.shape)} instead of {tuple(ours.shape)}; not written")
    scale = float(ours.abs().max())
    err = float((ours.float() - theirs.float()).abs().max())
    if not err <= PARITY_RTOL * max(scale, 1e-12):  # also catches NaN
        raise ValueError(f"{what} does not reproduce the model (largest output difference {err:.3g}, outputs up to "
                         f"{scale:.3g}); nothing written: check the installed version against docs/interop.md")


def parity_input(cfg: Any, seed: int = 0) -> torch.Tensor:
    """A fixed batch of 2 normalised-looking inputs (N(0, 1)) at the model's size, for the export checks."""
    h, w = cfg.img_hw
    return torch.randn(2, cfg.in_chans, h, w, generator=torch.Generator().manual_seed(seed))
