"""The training engine shared by every command: optimizer, schedules, precision, DDP, checkpoints, logging."""

from ..data.samples import TrainingData
from .config import OptimConfig, TrainConfig
from .distributed import DistInfo, cleanup, init_distributed, seed_everything
from .optim import build_optimizer, param_groups, set_schedule
from .schedule import cosine_schedule, warmup_iterations
from .state import find_resume, list_checkpoints, load_train_state, save_checkpoint
from .trainer import FitResult, NonFiniteLossError, Trainer

__all__ = [
    "DistInfo",
    "FitResult",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "build_optimizer",
    "cleanup",
    "cosine_schedule",
    "find_resume",
    "init_distributed",
    "list_checkpoints",
    "load_train_state",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
    "set_schedule",
    "warmup_iterations",
]
