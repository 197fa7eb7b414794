"""Joint image + label-map augmentation for segmentation (mmseg's ADE20K pipeline on torchvision transforms v2,
with ``tv_tensors.Mask`` so the label map follows every geometric step with nearest interpolation): see the module
docstring of `beitv2.data.segmentation` for the pipeline and its order."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import check, opt
from .transforms import resolve_norm

IGNORE_INDEX = 255  # label of pixels no loss or metric counts (mmseg's, and ADE20K's "other" after reduction)


class RatioResize(v2.Transform):
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``: the scale (long, short) times a ratio drawn in
    ``ratio_range``; the image is rescaled by the largest factor keeping its long side <= long and short side <=
    short (bilinear for the image, nearest for the mask)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] | None = (0.5, 2.0)):
        super().__init__()
        self.scale, self.ratio_range = (max(scale), min(scale)), ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        r = 1.0
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            r = lo + float(torch.rand(())) * (hi - lo)
        long_, short = self.scale[0] * r, self.scale[1] * r
        f = min(long_ / max(h, w), short / min(h, w))
        return {"size": [max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


class CatMaxRatioCrop(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random crop (the whole side where the image is smaller),
    re-drawn up to 10 times until no class covers ``cat_max_ratio`` or more of its labelled pixels."""

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return top, left, ch, cw

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        box = self._draw(h, w)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                t, lf, ch, cw = box
                crop = mask[..., t:t + ch, lf:lf + cw].reshape(-1)
                crop = crop[crop != self.ignore_index]
                if crop.numel():
                    cnt = torch.bincount(crop.long())
                    cnt = cnt[cnt > 0]
                    if len(cnt) > 1 and float(cnt.max()) / float(cnt.sum()) < self.cat_max_ratio:
                        break
                box = self._draw(h, w)
        return {"box": box}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        t, lf, ch, cw = params["box"]
        return TF.crop(inpt, t, lf, ch, cw)


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` on uint8 images, each step with probability 0.5: brightness + U(-32, 32),
    contrast x U(0.5, 1.5) (before or after the colour steps, at random), saturation x U(0.5, 1.5) and hue +
    U(-18, 18) degrees on OpenCV's 0..180 scale. Brightness and contrast are mmseg's plain additive / multiplicative
    steps with clipping; saturation and hue use torchvision's ``adjust_saturation`` / ``adjust_hue`` (blend with the
    grey image, HSV hue rotation) instead of OpenCV's HSV arithmetic. Grey images skip the colour steps. Masks pass
    through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u = torch.rand(9).tolist()
        lo_c, hi_c = self.contrast_range
        lo_s, hi_s = self.saturation_range
        return {"brightness": (u[0] < 0.5) * (u[1] * 2 - 1) * self.brightness_delta,
                "contrast_first": u[2] < 0.5,
                "contrast": lo_c + u[4] * (hi_c - lo_c) if u[3] < 0.5 else 1.0,
                "saturation": lo_s + u[6] * (hi_s - lo_s) if u[5] < 0.5 else 1.0,
                "hue": (u[8] * 2 - 1) * self.hue_delta / 180.0 if u[7] < 0.5 else 0.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor).float()
        if params["brightness"]:
            x = (x + params["brightness"]).clamp(0, 255)
        if params["contrast_first"] and params["contrast"] != 1.0:
            x = (x * params["contrast"]).clamp(0, 255)
        x = x.round().to(torch.uint8)
        if x.shape[-3] == 3:
            if params["saturation"] != 1.0:
                x = TF.adjust_saturation(x, params["saturation"])
            if params["hue"]:
                x = TF.adjust_hue(x, params["hue"])
        if not params["contrast_first"] and params["contrast"] != 1.0:
            x = (x.float() * params["contrast"]).clamp(0, 255).round().to(torch.uint8)
        return tv_tensors.wrap(x, like=inpt)


@dataclasses.dataclass
class SegmentationAugConfig:
    """Joint image/label augmentation (``--aug.*``); defaults: mmseg's ADE20K pipeline."""

    scale: tuple[int, int] = opt((2048, 512), "resize scale (long, short) before the ratio")
    ratio_range: tuple[float, float] = opt((0.5, 2.0), "random ratio applied to the scale (training)")
    cat_max_ratio: float = opt(0.75, "random crop: re-draw (up to 10 times) while one class covers this share of "
                                     "the labelled pixels (1 = off)")
    hflip: float = opt(0.5, "horizontal flip probability")
    photometric: bool = opt(True, "mmseg PhotoMetricDistortion (brightness, contrast, saturation, hue)")
    test_scale: tuple[int, int] = opt((2048, 512), "evaluation resize scale (long, short); labels stay at full size")
    normalize: str = opt("imagenet", "input normalisation: imagenet (official), inception, clip, none or auto "
                                     "(the backbone's pre-training normalisation)")

    def validate(self, prefix: str = "aug.") -> None:
        check(len(self.scale) == 2 and min(self.scale) > 0, prefix + "scale", "two positive values")
        check(len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1], prefix + "ratio_range",
              "0 < low <= high")
        check(0 < self.cat_max_ratio <= 1, prefix + "cat_max_ratio", "must be in (0, 1]")
        check(0 <= self.hflip <= 1, prefix + "hflip", "must be in [0, 1]")
        check(len(self.test_scale) == 2 and min(self.test_scale) > 0, prefix + "test_scale", "two positive values")
        check(self.normalize in ("auto", "imagenet", "inception", "clip", "none"), prefix + "normalize",
              f"auto, imagenet, inception, clip or none, got {self.normalize!r}")


def norm_stats(norm: str, channels: int) -> tuple[list[float], list[float]]:
    ms = resolve_norm(norm, channels) or ((0.0,) * channels, (1.0,) * channels)
    return list(ms[0]), list(ms[1])


class SegmentationTrainTransform:
    """(PIL image, label map) -> (float image [C, S, S], long labels [S, S]); see the module docstring."""

    def __init__(self, a: SegmentationAugConfig, crop: tuple[int, int], channels: int, norm: str):
        self.crop = crop
        steps: list[Any] = [RatioResize(a.scale, a.ratio_range), CatMaxRatioCrop(crop, a.cat_max_ratio),
                            v2.RandomHorizontalFlip(a.hflip)]
        if a.photometric:
            steps.append(PhotoMetricDistortion())
        mean, std = norm_stats(norm, channels)
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]
        self.tf = v2.Compose(steps)

    def __call__(self, img: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.tf(tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(torch.from_numpy(mask)))
        h, w = label.shape[-2:]
        ph, pw = self.crop[0] - h, self.crop[1] - w
        image, label = image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()
        if ph > 0 or pw > 0:  # mmseg pads after normalisation: image 0, labels ignored
            image = torch.nn.functional.pad(image, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            label = torch.nn.functional.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        return image, label


class SegmentationEvalTransform:
    """Image resized to the test scale (keeping the aspect ratio) and normalised; labels at the original size."""

    def __init__(self, a: SegmentationAugConfig, channels: int, norm: str):
        mean, std = norm_stats(norm, channels)
        self.tf = v2.Compose([RatioResize(a.test_scale, None), v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(mean, std)])

    def __call__(self, img: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.tf(tv_tensors.Image(TF.pil_to_tensor(img))).as_subclass(torch.Tensor)
        return image, torch.from_numpy(mask.astype(np.int64))
