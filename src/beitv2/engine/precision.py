"""Mixed precision: autocast context and loss scaler for ``bf16`` / ``fp16`` / ``fp32``."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("beitv2.engine")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_precision(requested: str, device_type: str, bf16_native: bool) -> str:
    """bf16 only where the hardware computes it natively; elsewhere fp16 with a loss scaler.

    A pre-Ampere GPU (compute capability < 8) runs bf16 only by emulation, several times slower than fp16, and
    ``torch.cuda.is_bf16_supported()`` still says yes there; hence the native-only check.
    """
    if requested == "bf16" and device_type == "cuda" and not bf16_native:
        return "fp16"
    return requested


def resolve_precision(precision: str, device: torch.device) -> str:
    """`choose_precision` for this device (training and the frozen teachers / feature passes alike)."""
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    out = choose_precision(precision, device.type, native)
    if out != precision:
        log.warning("bf16 is only emulated on %s; using fp16 with a GradScaler", torch.cuda.get_device_name(device))
    return out


def autocast(device: torch.device, precision: str):
    """The autocast context for one forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Enabled only for fp16; bf16 has fp32's exponent range and needs no scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
