"""The training loop's running state: the stop flag a signal sets, the step metrics kept on the device, one epoch's
counters, and what `Trainer.fit` returns."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("beitv2.engine")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients) became NaN/inf; training stopped at the next check point and nothing was saved
    after that step."""


@dataclass
class FitResult:
    status: str  # "finished", "stopped" (stop_after_steps) or "interrupted" (signal)
    global_step: int
    checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0  # 128 + signal number when interrupted (the shell convention)


class StopFlag:
    """SIGTERM / first SIGINT ask for a checkpoint at the next step boundary; a second SIGINT aborts at once."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received signal %d: saving a checkpoint at the next step boundary (Ctrl-C again to abort)",
                    signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class DeviceMetrics:
    """An epoch's per-step metrics kept on the device: `add` never syncs; `read_last` / `epoch_sums` read them (one
    transfer) at check points. ``first_bad`` is the first step with a non-finite loss or gradient norm since the
    epoch start (-1), with that step's loss and gradient norm."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[str] = []
        self.last: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.bad_grad_norm = torch.zeros((), device=device)

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        if self.last is not None and keys != self.keys:
            raise RuntimeError(f"the task's metrics changed between steps: {self.keys} -> {keys}")
        self.keys, self.last = keys, values
        self.sums = values.double() if self.sums is None else self.sums + values.double()

    def flag_non_finite(self, finite: torch.Tensor, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        new = (finite < 1) & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_loss = torch.where(new, loss.float(), self.bad_loss)
        self.bad_grad_norm = torch.where(new, grad_norm.float(), self.bad_grad_norm)

    def bad_step(self) -> str:
        """Where the first non-finite step was, for the error (reads the device)."""
        first_bad, loss, norm = int(self.first_bad), float(self.bad_loss), float(self.bad_grad_norm)
        if math.isfinite(loss):
            return f"non-finite gradients at step {first_bad} (loss {loss}, gradient norm {norm})"
        return f"non-finite loss at step {first_bad} (loss {loss})"

    def read_last(self) -> dict[str, float]:
        return dict(zip(self.keys, self.last.tolist())) if self.last is not None else {}

    def epoch_sums(self) -> dict[str, float]:
        return dict(zip(self.keys, self.sums.tolist())) if self.sums is not None else {}


@dataclass
class EpochState:
    """One epoch's running state in `Trainer._run`: where it starts and ends, the step metrics kept on the device,
    counters for the log, and the micro-batches of the step being accumulated."""

    epoch: int
    first: int  # first micro-batch index (a resumed epoch skips the ones done)
    used: int  # micro-batches that make whole steps
    acc: DeviceMetrics
    n_steps: int = 0
    skipped: int = 0  # unreadable images
    t_log: float = field(default_factory=time.perf_counter)
    img_log: int = 0  # images (all ranks) since the last log line
    last: dict[str, float] = field(default_factory=dict)  # the metrics read at the last check point
    # the step being accumulated: its micro-batches' losses, metrics and the product of their isfinite(loss)
    micro_loss: list[torch.Tensor] = field(init=False)
    micro_metrics: list[dict[str, torch.Tensor]] = field(init=False)
    finite: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.start_step()

    def start_step(self) -> None:
        self.micro_loss, self.micro_metrics = [], []
        self.finite = torch.ones((), device=self.acc.device)
