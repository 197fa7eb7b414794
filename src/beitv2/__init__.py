"""beitv2: BEiT v2 (VQ-KD tokenizer + masked image modeling with patch aggregation) and BEiT v1, end to end.

The top-level API: `create_model` (a named architecture, untrained, with config overrides) and `load_model` (a model
file written by this library, or ``hf-hub:ORG/NAME``). Both return an ``nn.Module`` whose ``kind`` ('vit', 'vqkd',
'mim' or 'dvae') and ``config`` (its dataclass config) are attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

__all__ = ["__version__", "create_model", "load_model"]


def _tag(model: nn.Module, kind: str) -> nn.Module:
    """Make ``kind`` reachable from the model (every registered model class defines ``config`` itself)."""
    if not hasattr(model, "kind"):
        model.kind = kind
    return model


def create_model(name: str, **overrides: Any) -> nn.Module:
    """An untrained model of a named architecture (`beitv2.models.architectures`), config fields replaced by
    ``overrides`` (nested sections as mappings): ``create_model("beitv2_tiny", vocab_size=512)``."""
    from .models.architectures import build_model, get_architecture  # deferred: `import beitv2` loads no torch

    return _tag(build_model(name, **overrides), get_architecture(name)[0])


def load_model(path: str | Path) -> nn.Module:
    """A model saved by this library (a ``.safetensors`` file, a checkpoint or run folder, or ``hf-hub:ORG/NAME``),
    in eval mode."""
    from .checkpoint import load_model as _load  # deferred: `import beitv2` loads no torch

    model, kind, _ = _load(path)
    return _tag(model, kind)
