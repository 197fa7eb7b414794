"""`TeacherConfig` and `build_teacher`: the one way the commands get a frozen teacher."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

from ..checkpoint import read_metadata
from ..config import ConfigError, check, opt, reading
from .adapters import BEiTTeacher, HFTeacher, OpenCLIPTeacher, TimmTeacher, _timm_net_teacher
from .base import Teacher
from .hub import _offline_unless_reachable_quiet, offline_note

logger = logging.getLogger("beitv2.teachers")

# ---------------------------------------------------------------------------------------------- config / build

@dataclasses.dataclass
class TeacherConfig:
    kind: Literal["hf", "timm", "open_clip", "beitv2"] = opt("hf", "teacher library")
    name_or_path: str = opt("openai/clip-vit-base-patch16", "hf: hub id or local directory; timm: model name; "
                            "open_clip: model name, 'local-dir:PATH' or 'hf-hub:ID'; beitv2: checkpoint path")
    checkpoint: str = opt("", "timm/open_clip: weights file (.safetensors/.pth/.bin) loaded with weights only")
    input_size: int = opt(0, "teacher input resolution; 0 = the model's own (the tokenizer view is resized to it)")
    mean: tuple[float, ...] = opt((), "override the normalisation mean (empty: the model's own)")
    std: tuple[float, ...] = opt((), "override the normalisation std (empty: the model's own)")
    bf16: bool = opt(True, "run the teacher in bf16 autocast (official: fp16 autocast)")
    local_files_only: bool = opt(False, "hf: never contact the hub (only the local cache or a directory); "
                                        "HF_HUB_OFFLINE=1 does the same for every kind")
    random_init: bool = opt(False, "timm/open_clip without a checkpoint: random weights instead of the pretrained "
                                   "ones (only for testing a pipeline: the codes then mean nothing)")
    model_kwargs: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "timm/open_clip: extra create_model arguments, e.g. {img_size: 64}"})
    feature_norm: Literal["none", "layernorm"] = opt(
        "none", "normalise each patch feature over its channels (LayerNorm without affine) before VQ-KD sees it: "
                "for teachers whose last features are not layer-normed, e.g. a CNN's post-ReLU map (all >= 0, "
                "half zeros), where the raw features collapse the codebook; ViT teachers end in a LayerNorm already")

    def validate(self, prefix: str = "teacher.") -> None:
        check(self.kind in ("hf", "timm", "open_clip", "beitv2"), f"{prefix}kind",
              f"must be 'hf', 'timm', 'open_clip' or 'beitv2', got {self.kind!r}")
        check(bool(self.name_or_path), f"{prefix}name_or_path", "required")
        check(self.input_size >= 0, f"{prefix}input_size", f"must be >= 0, got {self.input_size}")
        check(len(self.mean) == len(self.std), f"{prefix}mean",
              f"mean and std need the same length, got {len(self.mean)} and {len(self.std)}")
        check(len(self.mean) in (0, 1, 3), f"{prefix}mean", f"needs 1 or 3 values, got {len(self.mean)}")
        check(all(s > 0 for s in self.std), f"{prefix}std", f"must be positive, got {self.std}")
        check(isinstance(self.model_kwargs, dict), f"{prefix}model_kwargs", "must be a mapping")
        check(self.feature_norm in ("none", "layernorm"), f"{prefix}feature_norm",
              f"must be none or layernorm, got {self.feature_norm!r}")
        if self.checkpoint:
            check(self.kind in ("timm", "open_clip"), f"{prefix}checkpoint",
                  "only for kind timm/open_clip (hf and beitv2 load from name_or_path)")
            check(os.path.isfile(self.checkpoint), f"{prefix}checkpoint", f"file not found: {self.checkpoint}")
        if self.random_init:
            check(self.kind in ("timm", "open_clip"), f"{prefix}random_init",
                  f"only for kind timm/open_clip ({self.kind} teachers always load their weights)")
            check(not self.checkpoint, f"{prefix}random_init", "give either a checkpoint or random_init, not both")
        if self.kind == "open_clip" and not (self.checkpoint or self.random_init
                                             or self.name_or_path.startswith(("hf-hub:", "local-dir:"))):
            raise ConfigError(f"{prefix}name_or_path: open_clip model {self.name_or_path!r} has no weights: give "
                              f"{prefix}checkpoint, an 'hf-hub:ID' or 'local-dir:PATH' name, or {prefix}random_init "
                              "true for random weights")
        if self.kind == "beitv2":
            check(os.path.exists(self.name_or_path) or self.name_or_path.startswith("hf-hub:"),
                  f"{prefix}name_or_path", f"not found: {self.name_or_path}")
        if self.kind == "hf" and self.name_or_path.startswith(("/", "./", "../", "~")):
            check(os.path.isdir(os.path.expanduser(self.name_or_path)), f"{prefix}name_or_path",
                  f"directory not found: {self.name_or_path}")


def build_teacher(cfg: TeacherConfig, grid_size: int | Sequence[int]) -> Teacher:
    """The frozen teacher for a tokenizer with patch grid ``grid_size``."""
    cfg.validate("teacher.")
    common = {"input_size": cfg.input_size, "mean": cfg.mean or None, "std": cfg.std or None, "bf16": cfg.bf16}
    if cfg.random_init:
        logger.warning("teacher %s has random weights (teacher.random_init): its features and the codes learnt "
                       "from them carry no meaning; fine for testing a pipeline only", cfg.name_or_path)
    if not _needs_hub(cfg):
        teacher = _build(cfg, grid_size, common)
    else:
        with _offline_unless_reachable_quiet() as offline:
            try:
                teacher = _build(cfg, grid_size, common)
            except ConfigError as e:
                if not offline or "HF_HUB_OFFLINE=1" in str(e):
                    raise
                raise ConfigError(f"teacher.name_or_path: cannot build a {cfg.kind} teacher from "
                                  f"{cfg.name_or_path!r}: {offline_note(offline)}") from None
    teacher.feature_norm = cfg.feature_norm
    return teacher


def _needs_hub(cfg: TeacherConfig) -> bool:
    """Whether building this teacher may download from the Hugging Face hub."""
    name = cfg.name_or_path
    if cfg.kind == "hf":
        return not os.path.isdir(os.path.expanduser(name))
    if cfg.kind == "timm":
        return not (cfg.checkpoint or cfg.random_init)
    return name.startswith("hf-hub:") and not cfg.checkpoint


def _build(cfg: TeacherConfig, grid_size: int | Sequence[int], common: dict[str, Any]) -> Teacher:
    option = "teacher.checkpoint" if cfg.checkpoint else "teacher.name_or_path"
    with reading(option, f"cannot build a {cfg.kind} teacher from {cfg.name_or_path!r}: "):
        if cfg.kind == "hf":
            return HFTeacher(cfg.name_or_path, grid_size, local_files_only=cfg.local_files_only, **common)
        if cfg.kind == "timm":
            return TimmTeacher(cfg.name_or_path, grid_size, checkpoint=cfg.checkpoint, model_kwargs=cfg.model_kwargs,
                               pretrained=not cfg.random_init, **common)
        if cfg.kind == "open_clip":
            return OpenCLIPTeacher(cfg.name_or_path, grid_size, checkpoint=cfg.checkpoint,
                                   model_kwargs=cfg.model_kwargs, **common)
        if read_metadata(cfg.name_or_path).get("kind") == "timm":
            return _timm_net_teacher(cfg.name_or_path, grid_size, cfg.bf16)
        return BEiTTeacher(cfg.name_or_path, grid_size, **common)
