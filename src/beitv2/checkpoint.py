"""Model weights on disk: one safetensors file that also carries what it is (kind) and how to build it (config).

No pickle is involved, so loading a file never runs code. Files are written atomically: a temporary file in the same
folder, flushed and fsync'ed, then renamed over the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import from_dict, to_dict
from .models.registry import get_kind, kind_of, kinds
from .utils.files import atomic_write

FORMAT = "beitv2"
WEIGHTS_NAME = "model.safetensors"


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


def resolve_weights(path: str | Path) -> Path:
    """A weights file, a folder holding `model.safetensors` (a checkpoint directory), or ``hf-hub:ORG/NAME``."""
    from .interop.hub import hub_weights, is_hub_ref

    if is_hub_ref(path):
        return hub_weights(str(path))
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


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(resolve_weights(path)), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file loaded with ``weights_only=True``."""
    p = resolve_weights(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    import pickle

    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{p}: a pickle that is not weights-only (refused: loading it could run code); "
                         f"{str(e).splitlines()[0]}") from None


def load_model(path: str | Path, strict: bool = True) -> tuple[nn.Module, str, dict]:
    """Rebuild a model saved by `save_model`: returns (model in eval mode, kind, config as a dict)."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "kind" not in meta:
        raise ValueError(f"{path} is not a beitv2 model file (no beitv2 metadata); official .pth files are read by "
                         "`beitv2 convert` / beitv2.interop")
    kind = meta["kind"]
    if kind not in kinds():
        raise ValueError(f"{path}: unknown model kind {kind!r} (known: {', '.join(kinds())})")
    spec = get_kind(kind)
    cfg_dict = json.loads(meta["config"])
    model = spec.build(from_dict(spec.config_class, cfg_dict))
    missing, unexpected = model.load_state_dict(load_state_dict(path), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match a {kind} model built from its config: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval(), kind, cfg_dict
