"""AdamW with weight-decay / no-decay parameter groups and optional layer-wise lr decay.

Groups carry ``lr_scale`` (layer decay) and ``apply_wd`` so the per-step schedules can set
``lr = schedule[step] * lr_scale`` and ``weight_decay = wd_schedule[step]`` on decayed groups only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .config import OFFICIAL_NO_DECAY_NAMES, OptimConfig

LayerIdFn = Callable[[str], int]
ParamGroupFn = Callable[[nn.Module], list[dict]]
OptimizerFactory = Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]  # the Trainer's optimizer hook


def is_no_decay(name: str, param: torch.Tensor, names: Iterable[str], skip: Iterable[str] = ()) -> bool:
    """1-d params and biases, names in ``skip`` (e.g. ``model.no_weight_decay()``) and names having a dotted
    component listed in ``names`` are exempt from weight decay."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    parts = set(name.split("."))
    return bool(parts & set(names)) or any(name == s or name.endswith("." + s) for s in skip)


def param_groups(model: nn.Module, cfg: OptimConfig, layer_id_fn: LayerIdFn | None = None,
                 num_layers: int | None = None) -> list[dict]:
    """Split the trainable parameters of ``model`` into (layer, decay/no-decay) groups."""
    if cfg.official_no_decay:
        names, skip = OFFICIAL_NO_DECAY_NAMES, ()
    else:
        names = cfg.no_decay_names
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    use_layers = layer_id_fn is not None and cfg.layer_decay < 1.0
    if use_layers and num_layers is None:
        num_layers = 1 + max(layer_id_fn(n) for n, p in model.named_parameters() if p.requires_grad)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = is_no_decay(name, p, names, skip)
        layer = layer_id_fn(name) if use_layers else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = cfg.layer_decay ** (num_layers - 1 - layer) if use_layers else 1.0
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                           "apply_wd": not no_decay, "lr_scale": scale, "layer_id": layer}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, layer_id_fn: LayerIdFn | None = None,
                    num_layers: int | None = None, param_group_fn: ParamGroupFn | None = None,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` (or the groups ``param_group_fn(model)`` returns, which may set ``lr_scale`` and
    ``apply_wd`` themselves).

    ``fused`` None (default) uses PyTorch's fused AdamW kernel where every parameter is a floating-point tensor on CPU
    or CUDA: the same update in one kernel per parameter group instead of a dozen element-wise ops per tensor, and it
    takes a GradScaler's found-inf flag, so the trainer can skip a non-finite step without a host sync. False:
    PyTorch's default (for-loop on CPU, foreach on CUDA; the eager baseline of benchmarks/bench_train_step.py)."""
    groups = param_group_fn(model) if param_group_fn is not None else param_groups(model, cfg, layer_id_fn, num_layers)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g.setdefault("apply_wd", g.get("weight_decay", cfg.weight_decay) > 0)
        g.setdefault("weight_decay", cfg.weight_decay if g["apply_wd"] else 0.0)
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Apply one step of the lr / wd schedules to every group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if g.get("apply_wd", True):
            g["weight_decay"] = wd
