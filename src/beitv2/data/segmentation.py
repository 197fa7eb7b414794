"""Segmentation data: ADE20K, any image folder + mask folder, a Fashion-MNIST composition, joint augmentation.

Sources yield ``(PIL image, uint8 label map [H, W])``, or ``None`` for a pair that cannot be used: an unreadable image
or mask, a mask that is not single-channel, or an image and mask of different sizes are reported by path on the
"beitv2.data" logger, recorded in ``bad_files`` and dropped by `collate_segmentation`.

* **ADE20K** (``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png``): label 0 ("other") becomes the ignore index 255 and the 150 classes
  move to 0..149 (mmseg's ``reduce_zero_label``).
* **Folders**: ``images/`` and ``masks/`` matched by file stem (PNG masks of class ids; 'P' palette masks are read as
  their indices), class names from a text file (one per line) or just a class count.
* **Fashion-MNIST composition** (`FashionMNISTSegmentation`): sample ``i`` of a split is drawn from
  ``numpy.random.default_rng([seed, split, i])``: a ``canvas`` x ``canvas`` black image receives between
  ``min_items`` and ``max_items`` random Fashion-MNIST items of that split (28 x 28, uniform positions, later items
  on top). A pixel belongs to an item where the item's intensity is above ``threshold`` (16 of 255); it takes the
  item's value and label ``1 + class`` where that item is the top-most one there, otherwise it stays background
  (label 0). Classes: ``background`` + the ten Fashion-MNIST classes.

Training augmentation (mmseg's ADE20K pipeline, on torchvision transforms v2 with ``tv_tensors.Mask`` so the label
map follows every geometric step with nearest interpolation): `RatioResize` (scale ``(2048, 512)`` times a ratio in
[0.5, 2.0], keeping the aspect ratio), `CatMaxRatioCrop` (512 x 512, up to 10 tries until no class covers more than
75% of the labelled pixels), horizontal flip (0.5), `PhotoMetricDistortion`, normalisation, then padding to the crop
size (image 0, label 255). Evaluation resizes the image to the test scale (short side 512 for ADE20K, keeping the
label map at its original size) and normalises.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import check, opt
from .fmnist import FASHION_MNIST_CLASSES, FashionMNIST
from .folders import scan_images
from .images import BadFileLog, BadImageError, load_image
from .samples import TrainingData, TrainingSource, sample_seed
from .segmentation_transforms import IGNORE_INDEX

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
FMNIST_SEG_CLASSES = ("background",) + FASHION_MNIST_CLASSES


class BadMaskError(Exception):
    """A label map cannot be used; ``str(e)`` is the reason."""


def load_mask(path: str) -> np.ndarray:
    """A single-channel label map as uint8 [H, W] (palette images give their indices)."""
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadMaskError(f"mask mode {m.mode} is not single-channel (expected class ids, 'L' or 'P')")
            arr = np.asarray(m)
    except BadMaskError:
        raise
    except Exception as e:
        raise BadMaskError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadMaskError(f"class ids outside 0..255 (max {arr.max()})")
        arr = arr.astype(np.uint8)
    return arr


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1."""
    out = mask.astype(np.int16) - 1
    out[mask == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


# -------------------------------------------------------------------------------------------------- sources

class SegmentationFolder(BadFileLog, Dataset):
    """Images under ``image_dir`` paired with label maps under ``mask_dir`` by relative path without extension."""

    def __init__(self, image_dir: str, mask_dir: str, classes: Sequence[str], channels: int = 3,
                 reduce_zero: bool = False, mask_suffix: str = ".png"):
        for d in (image_dir, mask_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"folder not found: {d}")
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.classes = list(classes)
        self.channels, self.reduce_zero, self.mask_suffix = channels, reduce_zero, mask_suffix
        masks = {os.path.splitext(f)[0]: f for f in scan_images(mask_dir, (mask_suffix,))}
        self.pairs: list[tuple[str, str]] = []
        unpaired = 0
        for f in scan_images(image_dir):
            stem = os.path.splitext(f)[0]
            if stem in masks:
                self.pairs.append((f, masks[stem]))
            else:
                unpaired += 1
        if not self.pairs:
            raise FileNotFoundError(f"no image in {image_dir} has a mask ({mask_suffix}) of the same name in "
                                    f"{mask_dir}")
        self.unpaired = unpaired
        self._init_bad()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        img_rel, mask_rel = self.pairs[index]
        ipath, mpath = os.path.join(self.image_dir, img_rel), os.path.join(self.mask_dir, mask_rel)
        try:
            img = load_image(ipath, self.channels)
        except BadImageError as e:
            self._record_bad(ipath, str(e))
            return None
        try:
            mask = load_mask(mpath)
        except BadMaskError as e:
            self._record_bad(mpath, f"unreadable mask: {e}")
            return None
        if mask.shape != (img.height, img.width):
            self._record_bad(mpath, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image {ipath} "
                                    f"({img.width}x{img.height})")
            return None
        return img, (reduce_zero_label(mask) if self.reduce_zero else mask)


def ade20k(root: str, split: Literal["train", "val"], channels: int = 3) -> SegmentationFolder:
    """ADE20K (SceneParsing, ``ADEChallengeData2016``) with ``reduce_zero_label``; ``root`` is that folder or its
    parent."""
    base = root if os.path.isdir(os.path.join(root, "images")) else os.path.join(root, "ADEChallengeData2016")
    sub = "training" if split == "train" else "validation"
    return SegmentationFolder(os.path.join(base, "images", sub), os.path.join(base, "annotations", sub),
                              ADE20K_CLASSES, channels, reduce_zero=True)


class FashionMNISTSegmentation(Dataset):
    """Seeded compositions of Fashion-MNIST items on a larger canvas (see the module docstring)."""

    classes = list(FMNIST_SEG_CLASSES)

    def __init__(self, root: str | None = None, train: bool = True, size: int = 2000, canvas: int = 56,
                 min_items: int = 2, max_items: int = 4, threshold: int = 16, channels: int = 1, seed: int = 0):
        self.source = FashionMNIST(root, train=train, channels=1)
        self.images = self.source.images
        self.item_labels = self.source.labels
        self.train, self.size, self.canvas = train, int(size), int(canvas)
        self.min_items, self.max_items, self.threshold = int(min_items), int(max_items), int(threshold)
        self.channels, self.seed = channels, int(seed)
        self.bad_files: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.size

    def compose(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(self.train), index])
        c, s = self.canvas, self.images.shape[1]
        img = np.zeros((c, c), np.uint8)
        mask = np.zeros((c, c), np.uint8)
        for _ in range(int(rng.integers(self.min_items, self.max_items + 1))):
            j = int(rng.integers(len(self.images)))
            y, x = (int(v) for v in rng.integers(0, c - s + 1, size=2))
            item = self.images[j]
            fg = item > self.threshold
            img[y:y + s, x:x + s][fg] = item[fg]
            mask[y:y + s, x:x + s][fg] = 1 + int(self.item_labels[j])
        return img, mask

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        img, mask = self.compose(index)
        pil = Image.fromarray(img, mode="L")
        return (pil.convert("RGB") if self.channels == 3 else pil), mask


class SegmentationSamples(Dataset):
    """``{'image', 'mask', 'index'}`` from a source of ``(image, label map)`` pairs, under RNGs seeded by (seed,
    epoch, index) so that a resumed run augments exactly as an uninterrupted one."""

    def __init__(self, base: Any, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        item = self.base[index]
        if item is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            image, mask = self.transform(*item)
        return {"image": image, "mask": mask, "index": torch.tensor(index, dtype=torch.long)}

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class IterationEpochs(TrainingSource, Dataset):
    """An iteration-based schedule on the epoch-based engine: one "epoch" is ``length`` samples drawn from the
    source as an endless sequence of seeded permutations (every image once per pass, as mmseg's infinite sampler).
    Virtual epoch ``e`` holds positions ``e * length .. (e + 1) * length - 1`` of that sequence."""

    def __init__(self, samples: SegmentationSamples, length: int, seed: int = 0):
        self.samples, self.length, self.seed, self.epoch = samples, int(length), int(seed), 0
        self._perms: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.samples.set_epoch(epoch)

    def training_data(self) -> TrainingData:
        return TrainingData(self, set_epoch=self.set_epoch)

    def __len__(self) -> int:
        return self.length

    def source_index(self, index: int) -> int:
        n = len(self.samples)
        g = self.epoch * self.length + int(index)
        cycle, pos = divmod(g, n)
        if cycle not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[cycle] = np.random.default_rng([self.seed, cycle, 0x5E6]).permutation(n)
        return int(self._perms[cycle][pos])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        out = self.samples[self.source_index(index)]
        if out is not None:
            out["index"] = torch.tensor(int(index), dtype=torch.long)
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "samples":
            raise AttributeError(name)
        return getattr(self.samples, name)


def collate_segmentation(batch: list[dict | None]) -> dict[str, Any]:
    """Drop ``None`` samples (counted in ``num_skipped``); stack images and masks when their sizes agree, else keep
    lists (evaluation on images of different sizes)."""
    good = [s for s in batch if s is not None]
    out: dict[str, Any] = {"num_skipped": len(batch) - len(good)}
    if not good:
        return out
    for key in good[0]:
        vals = [s[key] for s in good]
        same = all(v.shape == vals[0].shape for v in vals)
        out[key] = torch.stack(vals) if same else vals
    return out


# ------------------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class SegmentationDataConfig:
    """Labelled segmentation data (``--data.*``)."""

    kind: Literal["ade20k", "folder", "fmnist"] = opt("ade20k", "ADE20K layout, an image folder + mask folder, or "
                                                      "the Fashion-MNIST composition")
    path: str = opt("", "ade20k: ADEChallengeData2016 or its parent; folder: the training image folder; fmnist: "
                        "the IDX folder (empty: /usr/share/datasets/fashion-mnist)")
    mask_path: str = opt("", "folder: the training mask folder")
    val_path: str = opt("", "folder: the validation image folder")
    val_mask_path: str = opt("", "folder: the validation mask folder")
    classes: str = opt("", "folder: a text file of class names, one per line (else num_classes)")
    num_classes: int = opt(0, "folder without a class file: number of classes (ids 0..n-1)")
    reduce_zero_label: bool = opt(False, "folder: label 0 is 'other' (ignored) and k becomes k - 1 (ADE20K: "
                                         "always)")
    fmnist_train_size: int = opt(2000, "fmnist: training compositions")
    fmnist_val_size: int = opt(500, "fmnist: validation compositions (from the test items)")
    fmnist_canvas: int = opt(56, "fmnist: canvas side in pixels")
    fmnist_items: tuple[int, int] = opt((2, 4), "fmnist: min and max items per canvas")
    num_workers: int = opt(2, "data loader workers")

    def validate(self, prefix: str = "data.") -> None:
        if self.kind == "ade20k":
            check(bool(self.path), prefix + "path", "the ADEChallengeData2016 folder (or its parent)")
        if self.kind == "folder":
            for name in ("path", "mask_path"):
                check(bool(getattr(self, name)), prefix + name, "required with data.kind folder")
            check(bool(self.classes) or self.num_classes >= 2, prefix + "classes",
                  "give a class file or data.num_classes >= 2")
            check(not self.classes or os.path.isfile(self.classes), prefix + "classes",
                  f"file not found: {self.classes}")
            check(bool(self.val_path) == bool(self.val_mask_path), prefix + "val_mask_path",
                  "give both val_path and val_mask_path, or neither")
        for name in ("path", "mask_path", "val_path", "val_mask_path"):
            v = getattr(self, name)
            check(not v or os.path.isdir(v), prefix + name, f"folder not found: {v}")
        check(self.fmnist_train_size >= 1 and self.fmnist_val_size >= 0, prefix + "fmnist_train_size",
              "sizes must be >= 1 (train) and >= 0 (val)")
        check(len(self.fmnist_items) == 2 and 1 <= self.fmnist_items[0] <= self.fmnist_items[1],
              prefix + "fmnist_items", "1 <= min <= max")
        check(self.fmnist_canvas >= 28, prefix + "fmnist_canvas", "at least 28 (one item)")
        check(self.num_workers >= 0, prefix + "num_workers", "must be >= 0")


def class_names(cfg: SegmentationDataConfig) -> list[str]:
    if cfg.kind == "ade20k":
        return list(ADE20K_CLASSES)
    if cfg.kind == "fmnist":
        return list(FMNIST_SEG_CLASSES)
    if cfg.classes:
        with open(cfg.classes) as f:
            return [line.strip() for line in f if line.strip()]
    return [str(i) for i in range(cfg.num_classes)]


def build_segmentation_source(cfg: SegmentationDataConfig, split: Literal["train", "val"], channels: int,
                              seed: int = 0) -> Dataset | None:
    """The (image, label map) source of a split; None when the data has no such split."""
    if cfg.kind == "ade20k":
        return ade20k(cfg.path, split, channels)
    if cfg.kind == "fmnist":
        size = cfg.fmnist_train_size if split == "train" else cfg.fmnist_val_size
        if size == 0:
            return None
        return FashionMNISTSegmentation(cfg.path or None, train=split == "train", size=size,
                                        canvas=cfg.fmnist_canvas, min_items=cfg.fmnist_items[0],
                                        max_items=cfg.fmnist_items[1], channels=channels, seed=seed)
    img, mask = (cfg.path, cfg.mask_path) if split == "train" else (cfg.val_path, cfg.val_mask_path)
    if not img:
        return None
    return SegmentationFolder(img, mask, class_names(cfg), channels, reduce_zero=cfg.reduce_zero_label)
