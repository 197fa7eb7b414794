"""The teacher adapters: HF transformers, timm, open_clip and this project's own backbones (see the package
docstring for what each returns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model
from ..data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
)
from ..models.backbone import BEiTViT
from ..utils.sizes import to_2tuple
from . import hub
from .base import Teacher, _stats

logger = logging.getLogger("beitv2.teachers")

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
                why = hub.offline_note(hub.offline_reason) if hub.offline_reason else str(e).splitlines()[0]
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
    net = load_model(path)[0]
    c = net.config
    net.net.reset_classifier(0)
    return TimmTeacher(c.name, grid_size, input_size=c.img_size, mean=c.mean, std=c.std, bf16=bf16, model=net.net)


class BEiTTeacher(Teacher):
    """A backbone saved by this project (kinds 'vit' or 'mim'): `BEiTViT.patch_features`. (A file of kind 'timm',
    a network trained here, becomes a `TimmTeacher` in `build_teacher`.)"""

    def __init__(self, path: str, grid_size: int | Sequence[int], input_size: int | Sequence[int] = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, bf16: bool = True):
        model, kind, _ = load_model(path)
        if not isinstance(model, BEiTViT):
            raise TypeError(f"{path}: a {kind!r} checkpoint is not a ViT backbone (use a 'vit' or 'mim' checkpoint)")
        model.head = nn.Identity()
        super().__init__(grid_size, input_size or model.vit_config.img_hw,
                         *_stats(mean, std, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)), model.embed_dim, bf16)
        if model.vit_config.in_chans == 1:
            self._mean, self._std = self._mean[:, :1], self._std[:, :1]
        self.model = model
        self.freeze()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.model.vit_config.img_hw:
            raise ValueError(f"input {tuple(x.shape[-2:])} differs from the backbone's {self.model.vit_config.img_hw}")
        return self.model.patch_features(x)
