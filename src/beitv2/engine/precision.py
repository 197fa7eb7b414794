"""Mixed precision: autocast context and loss scaler for ``bf16`` / ``fp16`` / ``fp32``."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform

import torch

log = logging.getLogger("beitv2.engine")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_precision(requested: str, device_type: str, bf16_native: bool) -> str:
    """bf16 only where the hardware computes it natively; elsewhere fp16 with a loss scaler on a GPU, fp32 on a CPU.

    A pre-Ampere GPU (compute capability < 8) runs bf16 only by emulation, several times slower than fp16, and
    ``torch.cuda.is_bf16_supported()`` still says yes there; hence the native-only check. An x86 CPU without
    AVX512-BF16 or AMX (e.g. an AVX2-only AMD EPYC) runs bf16 matmuls by a scalar fallback, far slower than fp32
    (docs/training.md gives the measurement); fp16 is emulated there too.
    """
    if requested != "bf16" or bf16_native:
        return requested
    return "fp16" if device_type == "cuda" else "fp32" if device_type == "cpu" else requested


_CPU_BF16: list[bool] = []  # the probe's answer, once (a plain global: torch.compile reads it without a graph break)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86: AVX512-BF16 or AMX). Other architectures are trusted:
    torch has no query for them (aarch64 with BF16, e.g. Graviton 3, is fast; one without it is not)."""
    if not _CPU_BF16:
        _CPU_BF16.append(_probe_cpu_bf16())
    return _CPU_BF16[0]


@torch.compiler.disable
def _probe_cpu_bf16() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    cpu = torch.backends.cpu.get_cpu_capability()  # noqa: F841 - initialises the dispatcher's CPU probe
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA: compute capability >= 8; CPU: `cpu_bf16_native`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_native()
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """`choose_precision` for this device (training and the frozen teachers / feature passes alike)."""
    out = choose_precision(precision, device.type, precision != "bf16" or bf16_native(device))
    if out != precision:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX)"
        fix = "fp16 with a GradScaler" if out == "fp16" else "fp32, much faster there"
        _warn_once(f"bf16 is only emulated on {where}; using {fix}")
    return out


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def bf16_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast for frozen helpers (teachers, tokenizers in reports) where the device computes bf16 natively;
    fp32 elsewhere (see `choose_precision`)."""
    on = enabled and bf16_native(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def autocast(device: torch.device, precision: str):
    """The autocast context for one forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Enabled only for fp16; bf16 has fp32's exponent range and needs no scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def step_scaler(loss_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                device: torch.device) -> torch.amp.GradScaler:
    """The scaler that drives each optimizer step, so that a step with non-finite gradients is skipped on the
    device, without a host read: fp16's loss scaler does that itself. Otherwise, for a fused optimizer (which takes
    PyTorch's found-inf flag from a GradScaler), a scaler fixed at scale 1: it scales nothing, finds non-finite
    gradients while "unscaling" them by 1 and hands the flag to the optimizer's step; `Trainer` keeps its scale at 1
    (``update(1.0)``). Other optimizers cannot skip on the device: a disabled scaler, the step is applied."""
    if loss_scaler.is_enabled():
        return loss_scaler
    fused = bool(optimizer.defaults.get("fused"))
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, enabled=fused)
    scaler.scale(torch.zeros((), device=device))  # creates its scale tensor on the device (no host read later)
    return scaler
