"""Frozen teachers whose patch features VQ-KD distils: HF transformers, timm, open_clip, or a beitv2 checkpoint.

A `Teacher` takes the tokenizer's own [0, 1] view and returns features on the tokenizer's patch grid, so any
teacher fits any tokenizer: it resizes the input to its own resolution (the official code has no such step: its
``--teacher_input_size`` is never used), applies its own normalisation, and resamples its feature
map to the tokenizer grid when the two differ. It runs frozen, in eval mode, without gradients, in bf16 autocast when
asked (the official teacher runs inside fp16 autocast).

What each adapter returns (last layer, prefix tokens dropped):

* CLIP (HF ``clip``/``clip_vision_model``, open_clip): every patch token through the final layernorm and the visual
  projection, exactly the official target ``ln_post(x)[:, 1:] @ proj``.
* DINO (HF ``vit``), DINOv2 (``dinov2``, ``dinov2_with_registers``), timm: patch tokens after the final norm.
* SigLIP (HF ``siglip``/``siglip_vision_model``): all tokens (no CLS) after ``post_layernorm``.
* beitv2 checkpoints: `BEiTViT.patch_features` (final ``norm``, or ``fc_norm`` when mean-pooling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, check, opt, reading
from .data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
)
from .engine.precision import bf16_autocast
from .utils.imaging import fit_input
from .utils.sizes import to_2tuple

logger = logging.getLogger("beitv2.teachers")

Stats = tuple[Sequence[float], Sequence[float]]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL converts RGB to 'L'


def infer_grid(num_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of ``num_tokens`` tokens from an ``input_hw`` image (same aspect ratio)."""
    H, W = input_hw
    p = math.sqrt(H * W / num_tokens)
    h, w = max(1, round(H / p)), max(1, round(W / p))
    if h * w != num_tokens:
        raise ValueError(f"cannot lay out {num_tokens} tokens on a grid for a {H}x{W} input")
    return h, w


class Teacher(nn.Module):
    """``forward(images01 [B, C, H, W] in [0, 1]) -> features [B, h*w, feature_dim]`` on ``grid_size``.

    Subclasses implement `encode` (normalised input at ``input_size`` -> patch tokens [B, n, D] in row-major order).
    """

    def __init__(self, grid_size: int | Sequence[int], input_size: int | Sequence[int], mean: Sequence[float],
                 std: Sequence[float], feature_dim: int, bf16: bool = True, resample_mode: str = "bicubic"):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.input_size = to_2tuple(input_size)
        self.feature_dim = int(feature_dim)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.bf16 = bf16
        self.resample_mode = resample_mode
        self.feature_norm = "none"  # or "layernorm": see TeacherConfig.feature_norm

    def freeze(self) -> Teacher:
        """fp32 weights (as the official ``model.float()``; hub checkpoints may load in fp16), no grads, eval."""
        self.float().requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode (no dropout, fixed norm statistics), whatever its parent asks."""
        return super().train(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """Resize to the teacher's resolution (bicubic, antialiased, clamped to [0, 1]) and normalise."""
        x = images01
        channels = self._mean.shape[1]
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)  # a grayscale tokenizer with an RGB teacher
        elif x.shape[1] == 3 and channels == 1:  # an RGB tokenizer with a grayscale teacher: PIL's 'L' weights
            x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] != channels:
            raise ValueError(f"teacher expects {channels}-channel input, got {x.shape[1]}")
        return fit_input(x, self.input_size, self._mean, self._std)

    def resample(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n, D] on the teacher's grid -> [B, h*w, D] on ``grid_size`` (interpolating the [B, D, h, w] map)."""
        own = infer_grid(tokens.shape[1], self.input_size)
        if own == self.grid_size:
            return tokens
        B, _, D = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(B, D, *own)
        smooth = self.resample_mode in ("bilinear", "bicubic")
        shrink = self.grid_size[0] < own[0] or self.grid_size[1] < own[1]  # antialias only when reducing
        fmap = F.interpolate(fmap, size=self.grid_size, mode=self.resample_mode,
                             align_corners=False if smooth else None, antialias=smooth and shrink)
        return fmap.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images01)
        with bf16_autocast(x.device, self.bf16):
            tokens = self.encode(x)
        out = self.resample(tokens.float())
        if self.feature_norm == "layernorm":
            out = F.layer_norm(out, (out.shape[-1],))
        return out.contiguous()

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, grid_size={self.grid_size}, feature_dim={self.feature_dim}, "
                f"mean={self.mean}, std={self.std}, bf16={self.bf16}, feature_norm={self.feature_norm}")


def _stats(mean: Sequence[float] | None, std: Sequence[float] | None, default: Stats) -> Stats:
    return (tuple(mean) if mean else tuple(default[0]), tuple(std) if std else tuple(default[1]))


# ------------------------------------------------------------------------------------------------ HF transformers

_HF_DEFAULT_STATS = {"clip": (CLIP_MEAN, CLIP_STD), "vit": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                     "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "siglip": (INCEPTION_MEAN, INCEPTION_STD)}
_HF_FAMILY = {"clip": "clip", "clip_vision_model": "clip", "vit": "vit", "dinov2": "dinov2",
              "dinov2_with_registers": "dinov2", "siglip": "siglip", "siglip_vision_model": "siglip"}


_HF_PROCESSOR = {"clip": "CLIPImageProcessor", "vit": "ViTImageProcessor", "dinov2": "BitImageProcessor",
                 "siglip": "SiglipImageProcessor"}


def _hf_processor(name_or_path: str, local_files_only: bool, family: str) -> Any:
    """The model's image processor (transformers' `AutoImageProcessor`), or None when it has none.

    A vision tower saved on its own (``clip_vision_model``) has a model type `AutoImageProcessor` does not map; its
    ``preprocessor_config.json`` is then read by the family's processor class.
    """
    import transformers as tr

    kw = {"local_files_only": local_files_only}
    try:
        return tr.AutoImageProcessor.from_pretrained(name_or_path, **kw)
    except OSError:  # no preprocessor_config.json: the family's defaults apply
        return None
    except ValueError:  # a config AutoImageProcessor cannot map to a class
        try:
            return getattr(tr, _HF_PROCESSOR[family]).from_pretrained(name_or_path, **kw)
        except (OSError, ValueError):
            return None


def _processor_size(proc: Any) -> tuple[int, int] | None:
    """The processor's input resolution: its centre crop when it crops, else its resize target."""

    def get(d: Any, key: str) -> Any:
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    for size in (crop, getattr(proc, "size", None)):
        if isinstance(size, int):
            return (size, size)
        if size is None:
            continue
        if get(size, "height") and get(size, "width"):
            return (int(get(size, "height")), int(get(size, "width")))
        if get(size, "shortest_edge"):
            return (int(get(size, "shortest_edge")),) * 2
    return None


class HFTeacher(Teacher):
    """A transformers vision model (CLIP, DINO ViT, DINOv2, SigLIP) from a hub id or a local directory."""

    def __init__(self, name_or_path: str, grid_size: int | Sequence[int], input_size: int | Sequence[int] = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, bf16: bool = True,
                 local_files_only: bool = False):
        import transformers as tr

        config = tr.AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
        model_type = config.model_type
        family = _HF_FAMILY.get(model_type)
        if family is None:
            raise ValueError(f"{name_or_path}: unsupported model_type {model_type!r} for a teacher "
                             f"(supported: {', '.join(_HF_FAMILY)})")
        kw: dict[str, Any] = {"local_files_only": local_files_only}
        self_proj: nn.Module = nn.Identity()
        post_norm: nn.Module = nn.Identity()
        if family == "clip":
            archs = config.architectures or []
            if model_type == "clip":
                full = tr.CLIPModel.from_pretrained(name_or_path, **kw)  # text tower dropped below, never kept
                vision, self_proj = full.vision_model, full.visual_projection
            elif any(a == "CLIPVisionModel" for a in archs):
                vision = tr.CLIPVisionModel.from_pretrained(name_or_path, **kw).vision_model
                logger.warning("%s has no visual projection: CLIP teacher features are the post-layernorm tokens "
                               "(the official target also applies the projection)", name_or_path)
            else:
                m = tr.CLIPVisionModelWithProjection.from_pretrained(name_or_path, **kw)
                vision, self_proj = m.vision_model, m.visual_projection
            post_norm = vision.post_layernorm  # HF applies it to the pooled CLS only; the target needs every token
            vcfg = vision.config
            num_prefix = 1
        elif family == "vit":
            vision = tr.ViTModel.from_pretrained(name_or_path, add_pooling_layer=False, **kw)
            vcfg, num_prefix = vision.config, 1
        elif family == "dinov2":
            cls = tr.Dinov2WithRegistersModel if model_type == "dinov2_with_registers" else tr.Dinov2Model
            vision = cls.from_pretrained(name_or_path, **kw)
            vcfg = vision.config
            num_prefix = 1 + int(getattr(vcfg, "num_register_tokens", 0) if model_type != "dinov2" else 0)
        else:
            m = (tr.SiglipModel if model_type == "siglip" else tr.SiglipVisionModel).from_pretrained(name_or_path, **kw)
            vision = getattr(m, "vision_model", m)
            vision = getattr(vision, "vision_model", vision)  # older transformers nest a SiglipVisionTransformer
            if hasattr(vision, "use_head"):
                vision.use_head = False  # the attention-pooled embedding is not needed
            vcfg, num_prefix = vision.config, 0  # HF's last_hidden_state is already after post_layernorm
        proc = _hf_processor(name_or_path, local_files_only, family)
        pmean, pstd = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        default = (pmean, pstd) if pmean is not None and pstd is not None else _HF_DEFAULT_STATS[family]
        size = input_size or (_processor_size(proc) if proc is not None else None) or vcfg.image_size
        dim = self_proj.out_features if isinstance(self_proj, nn.Linear) else vcfg.hidden_size
        super().__init__(grid_size, size, *_stats(mean, std, default), dim, bf16)
        self.model_type = model_type
        self.family = family
        self.num_prefix_tokens = num_prefix
        self.patch_size = int(vcfg.patch_size)
        self.vision = vision
        self.post_norm = post_norm
        self.proj = self_proj
        self.freeze()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.family in ("clip", "vit", "siglip") and \
            tuple(x.shape[-2:]) != to_2tuple(self.vision.config.image_size) else {}
        hidden = self.vision(pixel_values=x, **kwargs).last_hidden_state
        return self.proj(self.post_norm(hidden)[:, self.num_prefix_tokens:])


# ------------------------------------------------------------------------------------------------------------ timm

class TimmTeacher(Teacher):
    """A timm model by name; features = ``forward_features`` minus its prefix tokens.

    Weights: ``checkpoint`` when given, else timm's pretrained weights for the name (``pretrained=True``: timm
    fetches them through huggingface_hub, so its cache, ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` apply), else, only with
    ``pretrained=False``, random ones.
    """

    def __init__(self, name: str, grid_size: int | Sequence[int], checkpoint: str = "",
                 input_size: int | Sequence[int] = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, bf16: bool = True, model_kwargs: dict | None = None,
                 pretrained: bool = True, model: nn.Module | None = None):
        import timm
        from timm.models import load_state_dict

        if model is not None:  # a timm network trained here (`beitv2.models.timm_net.TimmNet.net`)
            pretrained = False
        else:
            try:
                model = timm.create_model(name, pretrained=pretrained and not checkpoint, num_classes=0,
                                          **(model_kwargs or {}))
            except (OSError, RuntimeError, ValueError) as e:
                if not (pretrained and not checkpoint):
                    raise
                why = _hub_off_note(_hub_off) if _hub_off else str(e).splitlines()[0]
                raise ValueError(f"timm could not load pretrained weights for {name} ({why}); "
                                 "give teacher.checkpoint, or teacher.random_init true for random weights") from e
        if checkpoint:
            state = load_state_dict(checkpoint, weights_only=True)
            own = model.state_dict()
            head = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier")]
            for k in head:  # classifier weights of a checkpoint with num_classes > 0
                del state[k]
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{checkpoint}: weights do not fit timm model {name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        pe = getattr(model, "patch_embed", None)
        own_size = tuple(pe.img_size) if pe is not None and getattr(pe, "img_size", None) else \
            tuple(pcfg.get("input_size", (3, 224, 224))[1:])
        default = (pcfg.get("mean", IMAGENET_DEFAULT_MEAN), pcfg.get("std", IMAGENET_DEFAULT_STD))
        super().__init__(grid_size, input_size or own_size, *_stats(mean, std, default), model.num_features, bf16)
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.freeze()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # a convolutional network: [B, C, h, w] (NHWC models give [B, h, w, C])
            nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
            return feats.flatten(1, 2) if nhwc else feats.flatten(2).transpose(1, 2)
        return feats[:, self.num_prefix_tokens:]


# ------------------------------------------------------------------------------------------------------- open_clip

class OpenCLIPTeacher(Teacher):
    """The visual tower of an open_clip model: patch tokens after ``ln_post``, projected by ``proj``.

    open_clip's ``VisionTransformer`` with ``output_tokens`` returns the patch tokens after ``ln_post`` (unless
    ``final_ln_after_pool``, where only the pooled token is normalised) but never projected; the missing steps are
    applied here so the target equals the official CLIP one.
    """

    def __init__(self, name: str, grid_size: int | Sequence[int], checkpoint: str = "",
                 input_size: int | Sequence[int] = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, bf16: bool = True, model_kwargs: dict | None = None):
        import open_clip
        from open_clip.transformer import VisionTransformer

        model = open_clip.create_model(name, pretrained=checkpoint or None, **(model_kwargs or {}))
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"open_clip model {name}: only ViT visual towers are supported, got "
                             f"{type(visual).__name__}")
        if visual.attn_pool is not None:
            raise ValueError(f"open_clip model {name}: attention-pooled towers have no patch-token output")
        pcfg = getattr(visual, "preprocess_cfg", {}) or {}
        default = (pcfg.get("mean", CLIP_MEAN), pcfg.get("std", CLIP_STD))
        dim = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
        super().__init__(grid_size, input_size or tuple(visual.image_size), *_stats(mean, std, default), dim, bf16)
        visual.output_tokens = True
        self.visual = visual  # the text tower is not kept
        self.freeze()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        _, tokens = v(x)
        if v.final_ln_after_pool:
            tokens = v.ln_post(tokens)
        if v.pool_type == "none":
            tokens = tokens[:, 1:]
        return tokens @ v.proj if v.proj is not None else tokens


# ------------------------------------------------------------------------------------------------- beitv2 models

def _timm_net_teacher(path: str, grid_size: int | Sequence[int], bf16: bool) -> Teacher:
    """A `TimmNet` file saved by this project: its timm network, at its own input size and normalisation."""
    from .checkpoint import load_model

    net = load_model(path)[0]
    c = net.config
    net.net.reset_classifier(0)
    return TimmTeacher(c.name, grid_size, input_size=c.img_size, mean=c.mean, std=c.std, bf16=bf16, model=net.net)


class BEiTTeacher(Teacher):
    """A backbone saved by this project (kinds 'vit' or 'mim'): `BEiTViT.patch_features`. (A file of kind 'timm',
    a network trained here, becomes a `TimmTeacher` in `build_teacher`.)"""

    def __init__(self, path: str, grid_size: int | Sequence[int], input_size: int | Sequence[int] = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, bf16: bool = True):
        from .checkpoint import load_model
        from .models.backbone import BEiTViT

        model, kind, _ = load_model(path)
        if not isinstance(model, BEiTViT):
            raise TypeError(f"{path}: a {kind!r} checkpoint is not a ViT backbone (use a 'vit' or 'mim' checkpoint)")
        model.head = nn.Identity()
        super().__init__(grid_size, input_size or model.cfg.img_hw,
                         *_stats(mean, std, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)), model.embed_dim, bf16)
        if model.cfg.in_chans == 1:
            self._mean, self._std = self._mean[:, :1], self._std[:, :1]
        self.model = model
        self.freeze()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.model.cfg.img_hw:
            raise ValueError(f"input {tuple(x.shape[-2:])} differs from the backbone's {self.model.cfg.img_hw}")
        return self.model.patch_features(x)


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
                                  f"{cfg.name_or_path!r}: {_hub_off_note(offline)}") from None
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


def _hub_off_note(why: str) -> str:
    return (f"not in the local hub cache and {why}: fetch it where there is network, or pass a local directory; "
            "then set HF_HUB_OFFLINE=1")


_hub_off = ""  # why the hub is off while a teacher is built (`_offline_unless_reachable`), for timm's message


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or the HTTPS proxy in the environment), given up after ``timeout`` seconds,
    name resolution included; the libraries' own attempts retry for tens of seconds before failing."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlsplit(proxy if proxy and hub_endpoint().startswith("https:") else hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[str]:
    """Yields why the hub is off ("" when it is reachable); while off, huggingface_hub (which transformers, timm
    and open_clip download through) reads only its local cache instead of retrying."""
    import huggingface_hub.constants as hub

    global _hub_off
    if hub.HF_HUB_OFFLINE:
        why, forced = "HF_HUB_OFFLINE is set", False
    elif hub_reachable():
        why, forced = "", False
    else:
        why, forced = f"{hub_endpoint()} is unreachable", True
    hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE or forced
    _hub_off = why
    try:
        yield why
    finally:
        _hub_off = ""
        if forced:
            hub.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def _offline_unless_reachable_quiet() -> Iterator[str]:
    """`_offline_unless_reachable`, without timm's "Loading pretrained weights from Hugging Face hub" line when the
    hub is off: the one line that matters then is the failure (or nothing)."""
    with _offline_unless_reachable() as offline:
        timm_log = logging.getLogger("timm")
        level = timm_log.level
        if offline:
            timm_log.setLevel(logging.WARNING)
        try:
            yield offline
        finally:
            timm_log.setLevel(level)


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
        from .checkpoint import read_metadata

        if read_metadata(cfg.name_or_path).get("kind") == "timm":
            return _timm_net_teacher(cfg.name_or_path, grid_size, cfg.bf16)
        return BEiTTeacher(cfg.name_or_path, grid_size, **common)

