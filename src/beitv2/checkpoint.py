"""Model weights on disk: one safetensors file that also carries what it is (kind) and how to build it (config).

No pickle is involved, so loading a file never runs code. Files are written atomically: a temporary file in the same
folder, flushed and fsync'ed, then renamed over the target, so a crash never leaves a half-written checkpoint.

`read_model_file` is the one reader of these files: every loader (`load_model`, the evaluation backbones,
fine-tuning, the tokenizer reference) starts from the `ModelFile` it returns; with ``backbone=True`` it holds the ViT
backbone of any kind that has one (where it sits is data in the kind's registry entry), so evaluation and fine-tuning
read a backbone in one call. A path is a file, a checkpoint or run folder, or a hub reference
``hf-hub:ORG/NAME[@REVISION]`` (`resolve_weights`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import from_dict, to_dict
from .models.backbone import ViTConfig
from .models.registry import KINDS, ModelKind, kind_of
from .utils.files import atomic_write

FORMAT = "beitv2"
WEIGHTS_NAME = "model.safetensors"
HUB_PREFIX = "hf-hub:"

__all__ = ["FORMAT", "WEIGHTS_NAME", "ModelFile", "atomic_write", "is_hub_ref", "kind_of", "load_model",
           "load_state_dict", "parse_hub_ref", "read_metadata", "read_model_file", "resolve_weights", "save_model"]


def save_model(path: str | Path, model: nn.Module, kind: str | None = None, config: Any = None,
               extra: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict and its config (JSON metadata) to a safetensors file, atomically.

    ``kind`` and ``config`` default to the model's own (`beitv2.models.registry.kind_of`, ``model.config``)."""
    kind = kind or kind_of(model).name
    config = config if config is not None else model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(to_dict(config))}
    meta.update(extra or {})
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


# ---------------------------------------------------------------------------------------------- where a file is

def is_hub_ref(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """'hf-hub:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); the revision is optional."""
    repo = str(ref)[len(HUB_PREFIX):]
    repo, _, rev = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{ref}: expected hf-hub:ORG/NAME[@REVISION]")
    return repo, rev or None


def hub_file(ref: str, filename: str = WEIGHTS_NAME) -> Path:
    """The local path of ``filename`` of the hub repo ``ref``, downloaded into (or read from) the HF cache, so its
    ``HF_HOME`` / ``HF_HUB_OFFLINE`` settings and tokens apply."""
    from huggingface_hub import hf_hub_download  # deferred: an optional package, needed for hub references only

    repo, rev = parse_hub_ref(ref)
    return Path(hf_hub_download(repo, filename, revision=rev))


def resolve_weights(path: str | Path) -> Path:
    """A weights file, a folder holding `model.safetensors` (a checkpoint directory; a run folder: its ``latest``),
    or ``hf-hub:ORG/NAME``."""
    if is_hub_ref(path):
        return hub_file(str(path))
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME
        latest = p / "latest"
        if latest.is_file():
            return resolve_weights(p / latest.read_text().strip())
        raise FileNotFoundError(f"{p} holds no {WEIGHTS_NAME}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


# ----------------------------------------------------------------------------------------------- reading a file

def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(resolve_weights(path)), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file loaded with ``weights_only=True``."""
    p = resolve_weights(path)
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{p}: a pickle that is not weights-only (refused: loading it could run code); "
                         f"{str(e).splitlines()[0]}") from None


@dataclass
class ModelFile:
    """What a beitv2 model file holds: its kind, its typed config and (unless read without) its weights; read with
    ``backbone=True``, the config and weights of its ViT backbone (a `ViTConfig`, keys relative to the backbone)."""

    path: Path  # the resolved file
    kind: str  # the file's kind, also when only its backbone was read
    config: Any  # the kind's config dataclass, or the backbone's ViTConfig
    config_dict: dict  # that config as written in the file
    description: str  # "<kind> checkpoint <path>", for logs and reports
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def spec(self) -> ModelKind:
        return KINDS[self.kind]


def read_model_file(path: str | Path, weights: bool = True, backbone: bool = False) -> ModelFile:
    """The one reader of beitv2 model files: the path resolved once, then kind, config and (``weights``) tensors.

    ``backbone``: only the ViT backbone, as the kind's registry entry places it (the field of the config, the key
    prefix; the pre-training-only keys left out), and only its tensors are read. A file without beitv2 metadata (an
    official ``.pth``, a foreign safetensors file), of a kind not registered, or (``backbone``) of a kind without a
    ViT raises ValueError naming the file."""
    p = resolve_weights(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"{p} is not a beitv2 model file (not safetensors); official .pth files are read by "
                         "`beitv2 convert` / beitv2.interop")
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT or "kind" not in meta or "config" not in meta:
            raise ValueError(f"{p} is not a beitv2 model file (no beitv2 metadata); official .pth files are read by "
                             "`beitv2 convert` / beitv2.interop")
        kind = meta["kind"]
        spec = KINDS.get(kind)
        if spec is None:
            raise ValueError(f"{p}: unknown model kind {kind!r} (known: {', '.join(KINDS)})")
        prefix, names = "", list(f.keys())
        if backbone:
            if spec.backbone is None:
                known = ", ".join(k for k, s in KINDS.items() if s.backbone is not None)
                raise ValueError(f"{p} is a {kind!r} model; expected one with a ViT backbone ({known})")
            # the rule of `ModelKind.backbone_state`, applied to the file's keys so that only these tensors are read
            prefix, drop = spec.backbone_prefix, spec.pretrain_only_keys
            names = [k for k in names if k.startswith(prefix) and not k[len(prefix):].startswith(drop)]
        state = {k[len(prefix):]: f.get_tensor(k) for k in names} if weights else {}
    cfg_dict = json.loads(meta["config"])
    cls = spec.config_class
    if backbone:
        cls, cfg_dict = ViTConfig, cfg_dict[spec.backbone] if spec.backbone else cfg_dict
    return ModelFile(p, kind, from_dict(cls, cfg_dict), cfg_dict, f"{kind} checkpoint {p}", state)


def load_model(path: str | Path, strict: bool = True) -> tuple[nn.Module, str, dict]:
    """Rebuild a model saved by `save_model`: returns (model in eval mode, kind, config as a dict)."""
    f = read_model_file(path)
    model = f.spec.build(f.config)
    missing, unexpected = model.load_state_dict(f.state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{f.path}: weights do not match a {f.kind} model built from its config: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval(), f.kind, f.config_dict
