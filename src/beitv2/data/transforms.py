"""Augmentations: BEiT's two-view pre-training pipeline, the VQ-KD tokenizer view and evaluation resizing.

All random draws go through torch's global CPU generator (torchvision v2 ops), so wrapping a call in
``torch.random.fork_rng`` after seeding (see `beitv2.data.samples`) makes it a pure function of that seed.

The transforms return uint8 [0, 255] tensors by default (``output='uint8'``): a quarter of the bytes of float32 to
collate, pass between processes, pin and copy to the device. Each declares, per returned view, the `ImageSpec` that
turns it into the float32 tensor the model sees; `prepare_batch` applies those on the device, once per batch, with
the operations torchvision's ToDtype + Normalize run, so the result equals the worker-side float path
(``output='float'``) bit for bit. Resizing, flips and colour jitter run on the PIL image (8-bit) in both paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..utils.sizes import to_2tuple

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

NAMED_NORMS = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD),
               "clip": (CLIP_MEAN, CLIP_STD)}
INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                  "bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS,
                  "box": InterpolationMode.BOX, "hamming": InterpolationMode.HAMMING}

Norm = str | tuple[Sequence[float], Sequence[float]] | None
Output = Literal["uint8", "float"]


def resolve_norm(norm: Norm, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """'imagenet' | 'inception' | 'clip' | 'none' | (mean, std) -> (mean, std) of length ``channels``, or None.

    Named RGB statistics are averaged over channels for 1-channel images (timm's convention for in_chans=1).
    """
    if norm is None or (isinstance(norm, str) and norm == "none"):
        return None
    if isinstance(norm, str):
        if norm not in NAMED_NORMS:
            raise ValueError(f"normalisation must be one of {sorted(NAMED_NORMS) + ['none']} or (mean, std), "
                             f"got {norm!r}")
        mean, std = NAMED_NORMS[norm]
    else:
        mean, std = norm
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std must have {channels} values, got {mean} / {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def to_tensor(img: Image.Image, norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> torch.Tensor:
    """PIL -> float [C, H, W] in [0, 1], then normalised when ``norm`` is given."""
    x = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
    return TF.normalize(x, list(norm[0]), list(norm[1])) if norm is not None else x


@dataclass(frozen=True)
class ImageSpec:
    """How a uint8 [0, 255] image tensor ([C, H, W] or a batch [B, C, H, W]) becomes float32: scaled to [0, 1], then
    normalised with ``norm`` = (mean, std) when set. The same float32 operations as `to_tensor` (torchvision's
    ``to_dtype(scale=True)`` then ``normalize``), in the same order, so the result is bitwise that of converting in
    the data-loader worker, on any device."""

    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    erasing: RandomErasing | None = None  # applied after normalising (fine-tuning's training view)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {x.dtype}")
        x = x.to(torch.float32).mul_(1.0 / 255)
        if self.norm is not None:
            x = x.sub_(_column(self.norm[0], x)).div_(_column(self.norm[1], x))
        return x if self.erasing is None else self.erasing(x)


ERASE_MODES = ("pixel", "rand", "const")


@dataclass(frozen=True)
class RandomErasing:
    """Random Erasing (Zhong et al. 2017) on a normalised batch [B, C, H, W] on its device: timm's `RandomErasing`
    (the official fine-tuning's ``reprob`` / ``remode`` / ``recount``) with the same distribution, drawn differently.

    Per image: with ``probability``, 1..``max_count`` rectangles (uniform count), each of area U(min_area, max_area)
    x H x W / count and aspect ratio exp(U(log min_aspect, -log min_aspect)), the first of 10 attempts that fits,
    at a uniform position; filled with N(0, 1) noise per pixel (``pixel``), per channel (``rand``) or zeros
    (``const``), i.e. noise in the normalised space. timm's class loops over the images in Python and draws from the
    process-global `random`; here all draws are one vectorised set of tensors from torch's generator on the batch's
    device (its state is in every checkpoint, so a resumed run draws the same), with no host sync, which lets the
    images travel as uint8 and be normalised on the device even when fine-tuning erases."""

    probability: float = 0.25
    mode: str = "pixel"
    max_count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    attempts: int = 10

    def __post_init__(self):
        if self.mode not in ERASE_MODES:
            raise ValueError(f"random erasing mode must be one of {ERASE_MODES}, got {self.mode!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        b, c, h, w = x.shape
        dev = x.device
        erase = torch.rand(b, device=dev) < self.probability
        count = torch.randint(1, self.max_count + 1, (b,), device=dev)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        lo, hi = math.log(self.min_aspect), -math.log(self.min_aspect)
        for k in range(self.max_count):
            u = torch.rand(b, self.attempts, 2, device=dev)
            area = (self.min_area + (self.max_area - self.min_area) * u[..., 0]) * (h * w) / count[:, None]
            aspect = torch.exp(lo + (hi - lo) * u[..., 1])
            eh, ew = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
            fits = (eh < h) & (ew < w)
            first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
            eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
            pos = torch.rand(b, 2, device=dev)
            top = (pos[:, 0] * (h - eh + 1)).long().clamp_max(h - eh)
            left = (pos[:, 1] * (w - ew + 1)).long().clamp_max(w - ew)
            on = erase & fits.any(1) & (k < count)
            t, l_ = top.view(b, 1, 1), left.view(b, 1, 1)
            region = (rows >= t) & (rows < t + eh.view(b, 1, 1)) & (cols >= l_) & (cols < l_ + ew.view(b, 1, 1))
            region = (region & on.view(b, 1, 1)).unsqueeze(1)  # [B, 1, H, W]
            if self.mode == "pixel":
                fill = torch.randn_like(x)
            elif self.mode == "rand":
                fill = torch.randn(b, c, 1, 1, device=dev, dtype=x.dtype)
            else:
                fill = torch.zeros((), device=dev, dtype=x.dtype)
            x = torch.where(region, fill, x)
        return x


def _column(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a float32 [C, 1, 1] tensor on ``like``'s device, filled there: copying a host tensor to a GPU
    would synchronise with the host (pageable memory), and a divide by a Python scalar multiplies by its reciprocal
    on CUDA (not bitwise the divide torchvision does)."""
    t = torch.empty(len(values), dtype=like.dtype, device=like.device)
    for i, v in enumerate(values):
        t[i].fill_(v)
    return t.view(-1, 1, 1)


def prepare_batch(batch: dict[str, Any], spec: Mapping[str, ImageSpec]) -> dict[str, Any]:
    """The batch with each entry named in ``spec`` converted by its `ImageSpec` (call it after moving the batch to
    the device: the conversion then runs there). A data set declares its spec as ``batch_spec``
    (`beitv2.data.samples.SeededDataset`); entries it does not name pass through unchanged."""
    if not spec:
        return batch
    out = dict(batch)
    for key, s in spec.items():
        if key in out:
            out[key] = s(out[key])
    return out


def _view(img: Image.Image, output: Output, norm: tuple[tuple[float, ...], tuple[float, ...]] | None
          ) -> torch.Tensor:
    return TF.pil_to_tensor(img) if output == "uint8" else to_tensor(img, norm)


def _spec(output: Output, norm: tuple[tuple[float, ...], tuple[float, ...]] | None) -> ImageSpec | None:
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    return ImageSpec(norm) if output == "uint8" else None


def _jitter(strength: float) -> v2.ColorJitter | None:
    return v2.ColorJitter(strength, strength, strength) if strength > 0 else None


class TwoViewTransform:
    """BEiT pre-training augmentation: one shared draw, two resolutions of the same crop.

    ColorJitter (no hue) -> horizontal flip -> one RandomResizedCrop parameter draw. View 1 (model input): the crop
    resized to ``input_size`` with ``train_interpolation``, normalised with ``normalize``. View 2 (tokenizer/teacher
    input): the *same* crop resized to ``second_input_size`` with ``second_interpolation``, in [0, 1].
    ``second_interpolation`` defaults to bicubic as in the official docs' commands; the official code default is
    lanczos (pass ``second_interpolation='lanczos'`` to match that).

    ``jitter_after_crop`` (default) applies the jitter to the resized views instead of the full image (the official
    order): the resized views have fewer pixels than a typical photo, and a single pass when both views are the same
    resize. The jitter factors are drawn first either way, so both orders see the same factors, flip and crop.
    ``output='uint8'`` (default) returns uint8 views and `specs` their conversion (see `prepare_batch`);
    ``'float'`` converts and normalises here.
    """

    def __init__(self, input_size: int | Sequence[int] = 224, second_input_size: int | Sequence[int] = 224,
                 min_crop_scale: float = 0.2, max_crop_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4, hflip: float = 0.5,
                 train_interpolation: str = "bicubic", second_interpolation: str = "bicubic",
                 normalize: Norm = "imagenet", channels: int = 3, jitter_after_crop: bool = True,
                 output: Output = "uint8"):
        if not 0 < min_crop_scale <= max_crop_scale <= 1:
            raise ValueError(f"need 0 < min_crop_scale <= max_crop_scale <= 1, got {min_crop_scale}, {max_crop_scale}")
        self.input_size = list(to_2tuple(input_size))
        self.second_input_size = list(to_2tuple(second_input_size))
        self.jitter = _jitter(color_jitter)
        self.jitter_after_crop = bool(jitter_after_crop)
        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None
        self.crop = v2.RandomResizedCrop(self.input_size, scale=(min_crop_scale, max_crop_scale), ratio=ratio)
        self.interp1 = interpolation(train_interpolation)
        self.interp2 = interpolation(second_interpolation)
        self.norm = resolve_norm(normalize, channels)
        self.output = output
        self.specs = (_spec(output, self.norm), _spec(output, None))

    def __repr__(self) -> str:
        return (f"TwoViewTransform(size={self.input_size}, second_size={self.second_input_size}, "
                f"scale={self.crop.scale}, jitter={self.jitter}, jitter_after_crop={self.jitter_after_crop}, "
                f"flip={self.flip is not None}, interp=({self.interp1.value}, {self.interp2.value}), "
                f"norm={self.norm}, output={self.output})")

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        jitter = self.jitter.make_params([img]) if self.jitter is not None else None
        if jitter is not None and not self.jitter_after_crop:
            img = self.jitter.transform(img, jitter)
        if self.flip is not None:
            img = self.flip(img)
        p = self.crop.make_params([img])
        box = (p["top"], p["left"], p["height"], p["width"])
        v1 = TF.resized_crop(img, *box, size=self.input_size, interpolation=self.interp1, antialias=True)
        # the same resize (e.g. a 28 px model and tokenizer, or 224 px bicubic for both): done once
        same = self.second_input_size == self.input_size and self.interp2 == self.interp1
        v2_ = v1 if same else TF.resized_crop(img, *box, size=self.second_input_size, interpolation=self.interp2,
                                               antialias=True)
        if jitter is not None and self.jitter_after_crop:
            v1 = self.jitter.transform(v1, jitter)
            v2_ = v1 if same else self.jitter.transform(v2_, jitter)
        return _view(v1, self.output, self.norm), _view(v2_, self.output, None)


class TokenizerTrainTransform:
    """VQ-KD training view: [ColorJitter if > 0] -> RandomResizedCrop -> flip, in [0, 1] (uint8 with its `specs` by
    default, as `TwoViewTransform`). ``jitter_after_crop`` (default) jitters the resized crop instead of the full
    image; the draws (jitter factors, crop, flip) are the same in both orders."""

    def __init__(self, size: int | Sequence[int] = 224, min_crop_scale: float = 0.08, color_jitter: float = 0.0,
                 hflip: float = 0.5, interpolation_name: str = "bicubic", jitter_after_crop: bool = True,
                 output: Output = "uint8"):
        self.size = list(to_2tuple(size))
        self.jitter = _jitter(color_jitter)
        self.jitter_after_crop = bool(jitter_after_crop)
        self.crop = v2.RandomResizedCrop(self.size, scale=(min_crop_scale, 1.0), ratio=(3 / 4, 4 / 3),
                                         interpolation=interpolation(interpolation_name), antialias=True)
        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None
        self.output = output
        self.specs = (_spec(output, None),)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        jitter = self.jitter.make_params([img]) if self.jitter is not None else None
        if jitter is not None and not self.jitter_after_crop:
            img = self.jitter.transform(img, jitter)
        img = self.crop(img)
        if self.flip is not None:
            img = self.flip(img)
        if jitter is not None and self.jitter_after_crop:
            img = self.jitter.transform(img, jitter)
        return _view(img, self.output, None)


class EvalTransform:
    """Resize the short side to ``resize_size`` (default crop / 0.875, i.e. 256 for 224), centre-crop, then
    normalised (``normalize='none'`` keeps [0, 1], the tokenizer's evaluation view); uint8 with its `specs` by
    default, as `TwoViewTransform`. ``resize=False`` skips the resize (the official path for inputs of 32 px or
    less); the centre crop is then a no-op at the model's size."""

    def __init__(self, crop_size: int | Sequence[int] = 224, resize_size: int | None = None,
                 interpolation_name: str = "bicubic", normalize: Norm = "imagenet", channels: int = 3,
                 resize: bool = True, output: Output = "uint8"):
        self.resize = resize
        self.crop_size = list(to_2tuple(crop_size))
        self.resize_size = int(resize_size) if resize_size else round(max(self.crop_size) / 0.875)
        self.interp = interpolation(interpolation_name)
        self.norm = resolve_norm(normalize, channels)
        self.output = output
        self.specs = (_spec(output, self.norm),)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.resize:
            img = TF.resize(img, [self.resize_size], interpolation=self.interp, antialias=True)
        img = TF.center_crop(img, self.crop_size)
        return _view(img, self.output, self.norm)
