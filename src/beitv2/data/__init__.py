"""Data: image sources, augmentations and per-sample training wrappers (see docs/data.md)."""

from .collate import collate_skip_bad
from .datasets import DataConfig, build_dataset
from .fmnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    IDXFormatError,
    fashion_mnist_tensors,
    read_idx,
    stratified_subset,
)
from .folders import ImageFolderDataset, scan_images
from .images import IMG_EXTENSIONS, BadImageError, convert_image, load_image
from .samples import IterableView, MIMDataset, SeededDataset, TokenizerTrainDataset, TransformDataset, for_loader
from .shards import WebDatasetShards, count_samples, expand_shards
from .transforms import (
    EvalTransform,
    ImageSpec,
    RandomErasing,
    TokenizerTrainTransform,
    TwoViewTransform,
    prepare_batch,
    resolve_norm,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMG_EXTENSIONS",
    "BadImageError",
    "DataConfig",
    "EvalTransform",
    "FashionMNIST",
    "fashion_mnist_tensors",
    "IDXFormatError",
    "ImageSpec",
    "RandomErasing",
    "ImageFolderDataset",
    "IterableView",
    "MIMDataset",
    "SeededDataset",
    "TokenizerTrainDataset",
    "TokenizerTrainTransform",
    "TransformDataset",
    "TwoViewTransform",
    "WebDatasetShards",
    "build_dataset",
    "collate_skip_bad",
    "count_samples",
    "convert_image",
    "expand_shards",
    "for_loader",
    "load_image",
    "prepare_batch",
    "read_idx",
    "resolve_norm",
    "scan_images",
    "stratified_subset",
]
