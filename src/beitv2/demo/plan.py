"""The quickstart's plans (sizes and schedules of each stage) and where it finds Fashion-MNIST."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import FASHION_MNIST_ROOT
from ..data.fmnist import find_idx

log = logging.getLogger("beitv2.quickstart")

NORM = "imagenet"  # model-view normalisation of every stage (the beitv2 teacher adapter's default too)


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules of one quickstart run (the 28 px images give a 7 x 7 grid of 4 px patches)."""

    train_subset: float  # images for tokenizer / pre-training: 0 = all, >= 1 = a count
    test_subset: float  # test images for evaluation and figures (0 = all)
    eval_train_subset: float  # training images the linear probe and k-NN fit on
    teacher_labels: float  # labelled training images of the stand-in teacher (fraction or count)
    teacher_val_subset: float  # test images the teacher's classifier and the tokenizer are validated on
    teacher_arch: str  # stand-in teacher: "cnn" (timm resnet10t, models/timm_net.py) or "vit" (teacher_vit)
    teacher_vit: tuple[int, int, int]  # width, depth, heads
    teacher_epochs: int
    teacher_batch: int
    teacher_lr: float
    tok_vit: tuple[int, int, int]
    tok_codes: int
    tok_code_dim: int
    tok_whole_codebook: bool  # the remedy for unused codes (QuantizerConfig.use_whole_codebook; off = the paper)
    tok_epochs: int
    tok_batch: int
    tok_lr: float
    mim_vit: tuple[int, int, int]
    mim_early_layers: int  # patch aggregation: patch tokens of this block feed the 2-block head
    mim_epochs: int
    mim_batch: int
    mim_lr: float
    mim_crop_scale: float  # smallest RandomResizedCrop area of the pre-training view (1 = the whole image, flip only)
    mask_patches: int
    mask_min_block: int
    mask_max_block: int  # largest block (official: no limit; at 7 x 7 small blocks teach more, docs/quickstart.md)
    probe_epochs: int
    probe_batch: int
    probe_lr: float  # AdamW lr per 256 images (scaled by batch / 256)
    knn_k: tuple[int, ...]
    probe_feature: str  # what the probes read from the last block: cls+mean, or cls+grid3 (patch tokens on a 3x3 grid)
    feature_batch: int
    num_workers: int


# The plan docs/quickstart.md measures (its time and scores are there, with the command). The tokenizer trains two
# epochs: its codes then carry more class information than the pixels, and the student is close to saturated on them
# after three MIM epochs. The probes read the CLS token and the patch tokens pooled to a 3x3 grid, as the pixels keep
# their layout. No data-loader worker: on 2 cores a worker takes CPU from the step.
FULL = Plan(train_subset=0, test_subset=0, eval_train_subset=5000, teacher_labels=38400, teacher_val_subset=2000,
            teacher_arch="cnn", teacher_vit=(96, 4, 3), teacher_epochs=1, teacher_batch=128, teacher_lr=3e-3,
            tok_vit=(64, 2, 4), tok_codes=256, tok_code_dim=32, tok_whole_codebook=True, tok_epochs=2, tok_batch=64,
            tok_lr=2e-3,
            mim_vit=(96, 4, 3), mim_early_layers=2, mim_epochs=3, mim_batch=64, mim_lr=8e-3, mim_crop_scale=1.0,
            mask_patches=20, mask_min_block=2, mask_max_block=6, probe_epochs=15, probe_batch=512, probe_lr=5e-3,
            knn_k=(10, 20), probe_feature="cls+grid3", feature_batch=1000, num_workers=0)
# Every stage on a subset with tiny models: a test of the pipeline, not of the method (minutes, not seconds: the
# stand-in teacher alone trains 5 epochs).
FAST = Plan(train_subset=1000, test_subset=400, eval_train_subset=1000, teacher_labels=500, teacher_val_subset=400,
            teacher_arch="cnn", teacher_vit=(32, 2, 2), teacher_epochs=5, teacher_batch=50, teacher_lr=4e-3,
            tok_vit=(32, 1, 2), tok_codes=64, tok_code_dim=16, tok_whole_codebook=True, tok_epochs=1, tok_batch=50,
            tok_lr=2e-3,
            mim_vit=(32, 2, 2), mim_early_layers=1, mim_epochs=1, mim_batch=50, mim_lr=1.5e-3, mim_crop_scale=1.0,
            mask_patches=20, mask_min_block=2, mask_max_block=6, probe_epochs=10, probe_batch=100, probe_lr=2e-2,
            knn_k=(10, 20), probe_feature="cls+grid3", feature_batch=500, num_workers=0)
# The full plan with eight MIM epochs instead of three: better probes at about twice the time (docs/quickstart.md).
LONG_MIM_EPOCHS = 8
LONG = replace(FULL, mim_epochs=LONG_MIM_EPOCHS)
PLANS = {"full": FULL, "long": LONG, "fast": FAST}
CNN_CHANNELS = (32, 48, 64, 96)  # the CNN stand-in's stage widths (timm resnet10t at quarter width); the last is its
# feature width


# ------------------------------------------------------------------------------------------------------ data

def resolve_data_path(path: str) -> str:
    """A folder with the Fashion-MNIST IDX files: ``path``, the Debian package's, or a torchvision download.

    Raises FileNotFoundError with instructions when none is available."""
    def ok(root: str) -> bool:
        return all(find_idx(root, f"{s}-{k}") for s in ("train", "t10k")
                   for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))

    if path:
        if ok(path):
            return path
        raise FileNotFoundError(f"--data.path {path}: no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], "
                                "train-labels-idx1-ubyte[.gz], t10k-...) found there; `sudo apt-get install "
                                f"dataset-fashion-mnist` puts them in {FASHION_MNIST_ROOT}")
    if ok(FASHION_MNIST_ROOT):
        return FASHION_MNIST_ROOT
    cache = Path.home() / ".cache" / "beitv2" / "fashion-mnist"
    if ok(str(cache)):
        return str(cache)
    try:
        import torchvision

        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(cache), train=train, download=True)
        if ok(str(cache)):
            return str(cache)
    except Exception as e:  # offline: say how to get the data
        log.info("torchvision download failed: %s", e)
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` (files in "
        f"{FASHION_MNIST_ROOT}), or pass --data.path to a folder holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or run once online "
        f"(torchvision downloads them to {cache}).")
