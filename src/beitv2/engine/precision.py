"""Mixed precision: autocast context and loss scaler for ``bf16`` / ``fp16`` / ``fp32``."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("beitv2.engine")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 where the device supports it, else fp16 with a loss scaler (old GPUs)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("bf16 is not supported on %s; using fp16 with a GradScaler", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for one forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Enabled only for fp16; bf16 has fp32's exponent range and needs no scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
