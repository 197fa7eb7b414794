"""Rank-0 run logging: a tqdm bar, ``metrics.jsonl`` and TensorBoard scalars.

``metrics.jsonl`` holds one JSON object per line: ``{"type": "step", "step", "epoch", "lr", "wd", <loss terms>,
"grad_norm", "images_per_s", ...}`` every ``log_every_steps`` optimizer steps, ``{"type": "epoch", ...}`` with the
epoch's averages, and ``{"type": "val", ...}`` after each validation pass. A resumed run appends to the file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("beitv2.engine")


def _tb_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        log.info("tensorboard is not installed; skipping TensorBoard logging")
        return None
    return SummaryWriter(str(log_dir))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Does nothing on ranks other than 0 (``enabled=False``)."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, initial_step: int = 0,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the run
        if tensorboard:
            self.tb = _tb_writer(out_dir / "tb")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            smoothing=0.1)

    def write(self, kind: str, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """One metrics.jsonl line plus TensorBoard scalars under ``<kind>/<name>``."""
        if not self.enabled:
            return
        rec = {"type": kind, "step": step, "epoch": epoch, "time": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in metrics.items()})
        self.file.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, n: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
        self.bar = self.tb = self.file = None
