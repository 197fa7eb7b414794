"""The engine's typed options: `OptimConfig` (``--optim.*``) and `TrainConfig` (``--train.*``).

Commands embed both in their own config dataclass, choosing defaults that reproduce the official recipe of that
command (``opt(factory=...)``), so ``--help`` shows the recipe's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import check, opt
from .logger import WANDB_MISSING, wandb_available

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")
OFFICIAL_NO_DECAY_NAMES = ("pos_embed", "cls_token")


@dataclass
class OptimConfig:
    lr: float = opt(5e-4, "peak learning rate (after warmup), per optimizer step")
    min_lr: float = opt(1e-5, "final learning rate of the cosine schedule")
    lr_reference_batch: int = opt(0, "if > 0, scale lr and min_lr by total_batch / this (official VQ-KD: 128); "
                                     "0 = use lr as given")
    weight_decay: float = opt(0.05, "AdamW weight decay (decoupled)")
    weight_decay_end: float | None = opt(None, "final weight decay of a cosine WD schedule (None = constant)")
    warmup_epochs: float = opt(5.0, "linear warmup from 0, in epochs")
    warmup_steps: int = opt(0, "linear warmup from 0, in optimizer steps (overrides warmup_epochs when > 0)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    clip_grad: float | None = opt(None, "max global grad norm (None = measure the norm only)")
    no_decay_names: tuple[str, ...] = opt(NO_DECAY_NAMES, "parameter-name components exempt from weight decay "
                                                          "(1-d params and biases always are)")
    official_no_decay: bool = opt(False, "exempt only 1-d params, biases, pos_embed and cls_token, as the official "
                                         "code does (it decays mask_token and the relative position tables); the "
                                         "pretrain, finetune and train-tokenizer commands default to true")
    layer_decay: float = opt(1.0, "layer-wise lr decay factor (1.0 = off; needs a layer-id function)")
    schedule: Literal["cosine", "poly"] = opt("cosine", "lr schedule after warmup: cosine to min_lr, or poly "
                                                        "(mmcv's, the official segmentation schedule)")
    poly_power: float = opt(1.0, "power of the poly schedule")
    warmup_ratio: float = opt(0.0, "poly: the warmup starts at this fraction of the lr (mmcv; official "
                                   "segmentation: 1e-6)")

    def validate(self, prefix: str = "") -> None:
        check(self.lr > 0, f"{prefix}lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"{prefix}min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.lr_reference_batch >= 0, f"{prefix}lr_reference_batch", "must be >= 0")
        check(self.weight_decay >= 0, f"{prefix}weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.weight_decay_end is None or self.weight_decay_end >= 0, f"{prefix}weight_decay_end",
              "must be >= 0")
        check(self.warmup_epochs >= 0, f"{prefix}warmup_epochs", "must be >= 0")
        check(self.warmup_steps >= 0, f"{prefix}warmup_steps", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0, f"{prefix}eps", "must be > 0")
        check(self.clip_grad is None or self.clip_grad > 0, f"{prefix}clip_grad", "must be > 0 or None")
        check(0 < self.layer_decay <= 1, f"{prefix}layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.poly_power > 0, f"{prefix}poly_power", "must be > 0")
        check(0 <= self.warmup_ratio <= 1, f"{prefix}warmup_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/train", "where checkpoints, metrics.jsonl, config.yaml and TensorBoard go")
    epochs: int = opt(100, "number of epochs")
    batch_size: int = opt(64, "images per process per micro-batch")
    accum_steps: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    precision: Literal["bf16", "fp16", "fp32"] = opt("bf16", "autocast dtype; fp16 uses a GradScaler; bf16 falls "
                                                             "back to fp16 on a GPU without native bf16 and to fp32 "
                                                             "on a CPU without it (x86 without AVX512-BF16 / AMX)")
    compile: bool | None = opt(None, "torch.compile the model and its frozen tokenizer/teacher: true, false, or "
                                     "none = auto (on CUDA when the run has >= 200 steps left, off on CPU; falls "
                                     "back to eager if compiling fails)")
    tf32: bool = opt(True, "allow TF32 for fp32 matmuls on CUDA (the quantizer's nearest-code search stays exact "
                           "fp32)")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N (under torchrun: LOCAL_RANK)")
    seed: int = opt(0, "seed of the models' init (same on all ranks), of the data (seed, epoch, index) and of "
                       "training randomness (seed + rank)")
    dist_timeout_min: float = opt(30.0, "how long any rank waits in a collective (incl. the barriers behind which rank "
                                        "0 writes a checkpoint) before the job fails, in minutes")
    find_unused_parameters: bool = opt(False, "DDP find_unused_parameters (the official code uses True)")
    save_every_steps: int = opt(0, "also save a checkpoint every N optimizer steps (0 = only at epoch ends)")
    keep_last: int = opt(3, "checkpoints kept in output_dir (older ones are deleted)")
    resume: str = opt("auto", "auto (newest complete checkpoint in output_dir), none, or a checkpoint directory")
    stop_after_steps: int = opt(0, "save and stop after this global step, leaving the schedule unchanged "
                                   "(0 = run to the end); for time-sliced jobs")
    log_every_steps: int = opt(10, "write a metrics.jsonl line (and TensorBoard scalars) every N steps")
    stop_check_every_steps: int = opt(0, "under several processes, the ranks agree on a signal-requested stop "
                                         "(SIGTERM / Ctrl-C) at each log step and, when N > 0, also every N steps "
                                         "(one small all-reduce); one process stops at the next step boundary")
    eval_every_epochs: int = opt(1, "run the validation pass every N epochs (0 = never)")
    progress: bool = opt(True, "show a tqdm progress bar (rank 0)")
    tensorboard: bool = opt(True, "write TensorBoard scalars to output_dir/tb when tensorboard is installed")
    wandb: str = opt("", "Weights & Biases project to log the same scalars and the config to (rank 0; empty = off; "
                         "needs pip install wandb); WANDB_MODE=offline writes the run to disk only, under "
                         "output_dir/wandb unless WANDB_DIR is set; a resumed training continues its W&B run")
    wandb_entity: str = opt("", "W&B entity (user or team) of the run; empty = wandb's default (WANDB_ENTITY)")
    wandb_run_name: str = opt("", "W&B display name of the run; empty = wandb's choice (WANDB_NAME)")

    def validate(self, prefix: str = "") -> None:
        for name in ("epochs", "batch_size", "accum_steps", "keep_last", "log_every_steps"):
            check(getattr(self, name) >= 1, f"{prefix}{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.dist_timeout_min > 0, f"{prefix}dist_timeout_min", f"must be > 0, got {self.dist_timeout_min}")
        for name in ("save_every_steps", "stop_after_steps", "eval_every_epochs", "stop_check_every_steps"):
            check(getattr(self, name) >= 0, f"{prefix}{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"{prefix}device",
              f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.wandb:
            check(wandb_available(), f"{prefix}wandb", WANDB_MISSING)
        if self.resume not in ("auto", "none"):
            check(Path(self.resume).is_dir(), f"{prefix}resume", f"checkpoint directory not found: {self.resume}")
