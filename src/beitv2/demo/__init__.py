"""The quickstart demo (`beitv2 quickstart`) as a small package: the plans and where the data is (`plan`), the config
of each stage (`configs`), the stages, each one project command run on its typed config (`stages`), the rows that
are not a ViT backbone (`baselines`) and the run from options to report (`pipeline`).

It composes the commands, so it sits beside them in the top layer (docs/architecture.md); no command other than
``quickstart`` imports it.
"""

from .baselines import cnn_pooled_encoder, raw_pixel_scores, row_scores
from .configs import linprobe_config
from .pipeline import run_quickstart
from .plan import CNN_CHANNELS, FAST, FULL, LONG, LONG_MIM_EPOCHS, NORM, PLANS, Plan, resolve_data_path
from .stages import StageError, build_teacher_spec, train_cnn_teacher

__all__ = ["CNN_CHANNELS", "FAST", "FULL", "LONG", "LONG_MIM_EPOCHS", "NORM", "PLANS", "Plan", "StageError",
           "build_teacher_spec", "cnn_pooled_encoder", "linprobe_config", "raw_pixel_scores", "resolve_data_path",
           "row_scores", "run_quickstart", "train_cnn_teacher"]
