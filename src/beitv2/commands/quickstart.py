"""`beitv2 quickstart`: the whole BEiT v2 pipeline on Fashion-MNIST on a CPU, ending in a report folder.

Stages (`beitv2.demo`), each a command of the project run in this process on the typed config it would read from
``configs/<stage>.yaml``:

1. teacher - a user-given one (``--teacher.kind hf|timm|open_clip|beitv2 --teacher.name_or_path NAME``), or, since no
   CLIP/DINO weights can be fetched offline, a *stand-in*: a small CNN (timm ``resnet10t`` at a quarter width)
   trained supervised from random init on most of the training labels (``--teacher.stand_in vit``: a small ViT);
2. tokenizer - ``beitv2 train-tokenizer``: VQ-KD distilled from the teacher on all training images;
3. pre-training - ``beitv2 pretrain``: BEiT v2 masked image modeling (blockwise masking, patch aggregation) on all
   training images;
4. evaluation - ``beitv2 linprobe`` and ``beitv2 knn`` on the test split for the pre-trained backbone, a randomly
   initialised backbone of the same shape, the teacher and the raw pixels;
5. report - ``metrics.json``, ``report.md`` and PNG figures (training curves, codebook atlas, attention maps, masks).

The full run takes about 9 minutes on 2 CPU cores with AMX; ``--fast`` runs every stage on a subset with tiny models
for the test suite (4-7 minutes on 2 CPU cores: a test of the pipeline, not of the method).
Options follow the other commands' names (``--data.path``, ``--teacher.kind``, ``--features.feature``); the older
dashed spellings (``--data-path``, ``--teacher-kind``, ...) still work. See docs/quickstart.md.
"""

from __future__ import annotations

import argparse

from ..demo import FULL, LONG_MIM_EPOCHS, PLANS, run_quickstart
from ._training import add_print_config

HELP = "run the whole BEiT v2 pipeline on Fashion-MNIST in minutes on a CPU and write a report"
DESCRIPTION = __doc__


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="report folder (its stage sub-folders are replaced)")
    parser.add_argument("--plan", choices=tuple(PLANS), default="full",
                        help="sizes and schedules: full (the demo, about 9 minutes on 2 cores with AMX), "
                             f"long (the full plan with {LONG_MIM_EPOCHS} MIM epochs instead of {FULL.mim_epochs}, "
                             "about 18 minutes: the best recipe measured) or fast (tiny models on subsets, 4-7 "
                             "minutes on 2 CPU cores: a test of the pipeline, not of the method)")
    parser.add_argument("--fast", action="store_true", help="the same as --plan fast")
    parser.add_argument("--data.path", "--data-path", dest="data_path", default="",
                        help="folder holding the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist, "
                             "else a torchvision download when online)")
    parser.add_argument("--teacher.kind", "--teacher-kind", dest="teacher_kind",
                        choices=("hf", "timm", "open_clip", "beitv2"), default="hf",
                        help="library of --teacher.name_or_path")
    parser.add_argument("--teacher.name_or_path", "--teacher", dest="teacher", default="",
                        help="a real teacher for VQ-KD: HF hub id or directory, timm or open_clip model name, or a "
                             "beitv2 vit/mim checkpoint; empty = train the stand-in teacher (--teacher.stand_in)")
    parser.add_argument("--teacher.checkpoint", "--teacher-checkpoint", dest="teacher_checkpoint", default="",
                        help="timm/open_clip: weights file for --teacher.name_or_path")
    parser.add_argument("--teacher.stand_in", "--stand-in", dest="stand_in", choices=("cnn", "vit"), default="",
                        help="architecture of the stand-in teacher trained when --teacher.name_or_path is empty "
                             "(default: the plan's, cnn: timm resnet10t at 56 px, 7x7 feature map; vit: the earlier "
                             "4-block ViT)")
    parser.add_argument("--features.feature", "--probe-feature", dest="probe_feature",
                        choices=("cls+mean", "cls+grid3"), default="",
                        help="what the linear probe and k-NN read from the last block (default: the plan's, "
                             "cls+grid3 in every plan): the CLS token and the patch tokens pooled to a 3x3 grid, which "
                             "keeps their layout as the pixels keep theirs; cls+mean: CLS and the mean patch token "
                             "(docs/quickstart.md)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--segment", action="store_true", help="also fine-tune UperNet on each backbone for "
                        "segmentation on the Fashion-MNIST composition and add the mIoU to the report (beyond the "
                        "10-minute budget; docs/segmentation.md)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on, off with --fast)")
    add_print_config(parser)


def run(args: argparse.Namespace) -> int:
    return run_quickstart(args)
