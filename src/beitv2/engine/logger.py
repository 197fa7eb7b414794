"""Rank-0 run logging: a tqdm bar, ``metrics.jsonl``, TensorBoard scalars and (optionally) a Weights & Biases run.

``metrics.jsonl`` holds one JSON object per line: ``{"type": "step", "step", "epoch", "lr", "wd", <loss terms>,
"grad_norm", "images_per_s", ...}`` every ``log_every_steps`` optimizer steps, ``{"type": "epoch", ...}`` with the
epoch's averages, and ``{"type": "val", ...}`` after each validation pass. A resumed run appends to the file.
TensorBoard and W&B get the same numbers, named ``<type>/<name>``; W&B rows also carry ``global_step`` and ``epoch``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, one_line
from ..utils.files import WriteError, write_failure

log = logging.getLogger("beitv2.engine")

WANDB_ID_FILE = "wandb_run_id"  # in output_dir: the W&B run a resumed training continues
WANDB_MISSING = "needs the wandb package: pip install wandb (or pip install 'beitv2[wandb]')"


def wandb_available() -> bool:
    """Whether ``import wandb`` gives the real package (a stray ``./wandb`` run folder imports as an empty
    namespace package when wandb itself is missing)."""
    try:
        import wandb
    except ImportError:
        return False
    return hasattr(wandb, "init")


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


def _wandb_run(out_dir: Path, project: str, entity: str, name: str, config: dict | None, resumed: bool):
    """Start the W&B run (``wandb.init``), leaving to wandb's own settings and environment what this does not set:
    WANDB_MODE (``offline``: write the run to disk only), WANDB_API_KEY, WANDB_DIR (default here: ``output_dir``)
    and WANDB_RUN_ID. A resumed training continues the W&B run recorded in ``output_dir/wandb_run_id``."""
    import wandb

    id_file = out_dir / WANDB_ID_FILE
    run_id = None
    if resumed and id_file.is_file() and not os.environ.get("WANDB_RUN_ID"):
        run_id = id_file.read_text().strip() or None
    try:
        run = wandb.init(project=project, entity=entity or None, name=name or None, id=run_id, resume="allow",
                         dir=None if os.environ.get("WANDB_DIR") else str(out_dir), config=config or {})
    except Exception as e:  # no login, no network in online mode, a bad entity: say so on one line
        raise ConfigError(f"train.wandb: could not start the W&B run ({one_line(e)}); log in with `wandb login` "
                          "or set WANDB_MODE=offline") from None
    # steps may repeat after a resume (as in metrics.jsonl), so the x axis is a logged metric, not W&B's own _step
    run.define_metric("global_step")
    for name in ("epoch", "step/*", "epoch/*", "val/*"):
        run.define_metric(name, step_metric="global_step")
    id_file.write_text(run.id + "\n")
    return run


class RunLogger:
    """Does nothing on ranks other than 0 (``enabled=False``). ``wandb_project`` (non-empty) also logs to W&B, with
    ``run_config`` as the run's config; ``resumed`` continues the W&B run of the interrupted training."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, initial_step: int = 0,
                 progress: bool = True, tensorboard: bool = True, *, wandb_project: str = "", wandb_entity: str = "",
                 wandb_run_name: str = "", run_config: dict | None = None, resumed: bool = False):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.file = None
        self.wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        if wandb_project:
            if not wandb_available():
                raise ConfigError(f"train.wandb: {WANDB_MISSING}")
            self.wandb = _wandb_run(out_dir, wandb_project, wandb_entity, wandb_run_name, run_config, resumed)
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
        try:
            self.file.write(json.dumps(rec) + "\n")
        except OSError as e:  # a full disk: said in words, with what is kept
            raise WriteError(f"could not write {self.file.name}: {write_failure(e, Path(self.file.name).parent)}; "
                             "the checkpoints written so far are kept") from e
        scalars = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({"global_step": step, "epoch": epoch, **scalars})

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

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """``exit_code`` is what the W&B run records (0 = finished, else failed, as the process's exit status);
        ``preempted``: stopped by a signal with a checkpoint written, to be resumed (W&B's "preempting" mark).

        Every sink is closed even when another fails (a full disk fails the flushes); the first failure is raised
        afterwards."""
        bar, tb, file, run = self.bar, self.tb, self.file, self.wandb
        self.bar = self.tb = self.file = self.wandb = None
        errors: list[Exception] = []

        def attempt(fn, *args, **kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as e:
                errors.append(e)

        if bar is not None:
            attempt(bar.close)
        if tb is not None:
            attempt(tb.close)
        if file is not None:
            attempt(file.close)
        if run is not None:
            if preempted:
                attempt(run.mark_preempting)
            attempt(run.finish, exit_code=exit_code)
        if errors:
            raise errors[0]
