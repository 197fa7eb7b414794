"""The trained module as the loop runs it: DDP across processes, then ``torch.compile`` where it pays off."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.nn.parallel import DistributedDataParallel

from ..models.backbone import unfuse_short_cpu_attention
from .distributed import DistInfo

# torch.compile pays off once its warm-up (tens of seconds on a GPU, more for ViT-B) is spread over enough steps.
# On CPU the warm-up (Inductor's C++ build) has not been shown to pay back within a run here, so auto leaves CPU
# runs eager; `train.compile true` still compiles them.
COMPILE_AUTO_MIN_STEPS = 200
COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,
                                                   torch._inductor.exc.InductorError)


def resolve_compile(setting: bool | None, device: torch.device, steps: int) -> bool:
    """`TrainConfig.compile`: True / False as given; None (auto) compiles on CUDA when the run has at least
    `COMPILE_AUTO_MIN_STEPS` steps left, and never on CPU."""
    if setting is not None:
        return setting
    return device.type == "cuda" and steps >= COMPILE_AUTO_MIN_STEPS


def data_parallel(net: nn.Module, dist: DistInfo, find_unused_parameters: bool) -> nn.Module:
    """``net`` under DDP when several processes train (else ``net``)."""
    if not dist.enabled:
        return net
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    # buffers need a per-forward broadcast only when the forward changes them and ranks may disagree (batch norm
    # running stats); our ViTs hold constant index buffers and the quantizer all-reduces its own state
    running_stats = any(getattr(m, "track_running_stats", False) for m in net.modules())
    return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                   broadcast_buffers=running_stats, gradient_as_bucket_view=True)


def prepare_attention(net: nn.Module, device: torch.device, compiled: bool) -> None:
    """On CPU, short sequences train faster with explicit attention than with SDPA (`unfuse_short_cpu_attention`);
    the frozen helpers run forward only, where SDPA wins, and are left as they are."""
    if device.type == "cpu":
        unfuse_short_cpu_attention(net, compiled=compiled)


def compile_task(task: nn.Module, net: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the trained module and the task's frozen helpers (`TrainTask.helper_fns`); returns the
    compiled module. Inductor's graph cache goes to ``~/.cache/beitv2/inductor`` unless TORCHINDUCTOR_CACHE_DIR is set,
    so a second run (or a resume) of the same model skips most of the warm-up."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # not chosen by the user
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "beitv2" / "inductor")
    compiled = torch.compile(net)
    helpers = {name: torch.compile(fn) for name, fn in task.helper_fns().items()}
    task.wrap(compiled, helpers)
    return compiled
