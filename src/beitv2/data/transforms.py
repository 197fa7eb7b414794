"""Augmentations: BEiT's two-view pre-training pipeline, the VQ-KD tokenizer view and evaluation resizing.

All random draws go through torch's global CPU generator (torchvision v2 ops), so wrapping a call in
``torch.random.fork_rng`` after seeding (see `beitv2.data.samples`) makes it a pure function of that seed.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _jitter(strength: float) -> v2.ColorJitter | None:
    return v2.ColorJitter(strength, strength, strength) if strength > 0 else None


class TwoViewTransform:
    """BEiT pre-training augmentation: one shared draw, two resolutions of the same crop.

    ColorJitter (no hue) -> horizontal flip -> one RandomResizedCrop parameter draw. View 1 (model input): the crop
    resized to ``input_size`` with ``train_interpolation``, ToTensor, Normalize. View 2 (tokenizer/teacher input): the
    *same* crop resized to ``second_input_size`` with ``second_interpolation``, ToTensor only, in [0, 1].
    ``second_interpolation`` defaults to bicubic as in the official docs' commands; the official code default is
    lanczos (pass ``second_interpolation='lanczos'`` to match that).
    """

    def __init__(self, input_size: int | Sequence[int] = 224, second_input_size: int | Sequence[int] = 224,
                 min_crop_scale: float = 0.2, max_crop_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4, hflip: float = 0.5,
                 train_interpolation: str = "bicubic", second_interpolation: str = "bicubic",
                 normalize: Norm = "imagenet", channels: int = 3):
        if not 0 < min_crop_scale <= max_crop_scale <= 1:
            raise ValueError(f"need 0 < min_crop_scale <= max_crop_scale <= 1, got {min_crop_scale}, {max_crop_scale}")
        self.input_size = list(to_2tuple(input_size))
        self.second_input_size = list(to_2tuple(second_input_size))
        self.jitter = _jitter(color_jitter)
        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None
        self.crop = v2.RandomResizedCrop(self.input_size, scale=(min_crop_scale, max_crop_scale), ratio=ratio)
        self.interp1 = interpolation(train_interpolation)
        self.interp2 = interpolation(second_interpolation)
        self.norm = resolve_norm(normalize, channels)

    def __repr__(self) -> str:
        return (f"TwoViewTransform(size={self.input_size}, second_size={self.second_input_size}, "
                f"scale={self.crop.scale}, jitter={self.jitter}, flip={self.flip is not None}, "
                f"interp=({self.interp1.value}, {self.interp2.value}), norm={self.norm})")

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.jitter is not None:
            img = self.jitter(img)
        if self.flip is not None:
            img = self.flip(img)
        p = self.crop.make_params([img])
        box = (p["top"], p["left"], p["height"], p["width"])
        x1 = to_tensor(TF.resized_crop(img, *box, size=self.input_size, interpolation=self.interp1, antialias=True))
        if self.second_input_size == self.input_size and self.interp2 == self.interp1:
            x2 = x1.clone()  # the same resize (e.g. a 28 px model and tokenizer): done once
        else:
            x2 = to_tensor(TF.resized_crop(img, *box, size=self.second_input_size, interpolation=self.interp2,
                                           antialias=True))
        if self.norm is not None:
            x1 = TF.normalize(x1, list(self.norm[0]), list(self.norm[1]))
        return x1, x2


class TokenizerTrainTransform:
    """VQ-KD training view: [ColorJitter if > 0] -> RandomResizedCrop -> flip -> ToTensor in [0, 1]."""

    def __init__(self, size: int | Sequence[int] = 224, min_crop_scale: float = 0.08, color_jitter: float = 0.0,
                 hflip: float = 0.5, interpolation_name: str = "bicubic"):
        self.size = list(to_2tuple(size))
        self.jitter = _jitter(color_jitter)
        self.crop = v2.RandomResizedCrop(self.size, scale=(min_crop_scale, 1.0), ratio=(3 / 4, 4 / 3),
                                         interpolation=interpolation(interpolation_name), antialias=True)
        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.jitter is not None:
            img = self.jitter(img)
        img = self.crop(img)
        if self.flip is not None:
            img = self.flip(img)
        return to_tensor(img)


class EvalTransform:
    """Resize the short side to ``resize_size`` (default crop / 0.875, i.e. 256 for 224), centre-crop, ToTensor,
    Normalize (``normalize='none'`` keeps [0, 1], the tokenizer's evaluation view). ``resize=False`` skips the
    resize (the official path for inputs of 32 px or less); the centre crop is then a no-op at the model's size."""

    def __init__(self, crop_size: int | Sequence[int] = 224, resize_size: int | None = None,
                 interpolation_name: str = "bicubic", normalize: Norm = "imagenet", channels: int = 3,
                 resize: bool = True):
        self.resize = resize
        self.crop_size = list(to_2tuple(crop_size))
        self.resize_size = int(resize_size) if resize_size else round(max(self.crop_size) / 0.875)
        self.interp = interpolation(interpolation_name)
        self.norm = resolve_norm(normalize, channels)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.resize:
            img = TF.resize(img, [self.resize_size], interpolation=self.interp, antialias=True)
        img = TF.center_crop(img, self.crop_size)
        return to_tensor(img, self.norm)
