"""Data: image sources, augmentations and per-sample training wrappers (see docs/data.md)."""

from .datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    DataConfig,
    FashionMNIST,
    IDXFormatError,
    ImageFolderDataset,
    build_dataset,
    collate_skip_bad,
    read_idx,
    scan_images,
    stratified_subset,
)
from .images import IMG_EXTENSIONS, BadImageError, convert_image, load_image
from .mim_dataset import IterableView, MIMDataset, SeededDataset, TokenizerTrainDataset, TransformDataset, for_loader
from .shards import StreamPlan, WebDatasetShards, count_samples, expand_shards
from .transforms import EvalTransform, TokenizerTrainTransform, TwoViewTransform, resolve_norm

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMG_EXTENSIONS",
    "BadImageError",
    "DataConfig",
    "EvalTransform",
    "FashionMNIST",
    "IDXFormatError",
    "ImageFolderDataset",
    "IterableView",
    "MIMDataset",
    "SeededDataset",
    "StreamPlan",
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
    "read_idx",
    "resolve_norm",
    "scan_images",
    "stratified_subset",
]
