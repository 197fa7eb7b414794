"""The one training loop every command uses.

A *task* (``beitv2.tasks``) is an ``nn.Module`` holding the trainable ``model`` plus any frozen helpers (teacher,
tokenizer) and mapping a batch to ``(loss, metrics)``. The trainer owns everything else: DDP, autocast, gradient
accumulation and clipping, the per-step lr/wd schedules, logging, atomic checkpoints, step-granular resume, graceful
stop on SIGTERM/SIGINT, and a clear error on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..config import ConfigError, save_yaml, to_dict
from ..data.transforms import ImageSpec, prepare_batch
from ..models.backbone import unfuse_short_cpu_attention
from ..models.registry import kind_of
from ..utils.files import write_failure
from . import distributed as D
from . import state as S
from .config import OptimConfig, TrainConfig
from .logger import RunLogger
from .optim import OptimizerFactory, build_optimizer, set_schedule
from .precision import autocast, grad_scaler, resolve_precision
from .sampler import ResumableSampler, StreamPlan
from .schedule import cosine_schedule, lr_schedule, warmup_iterations

log = logging.getLogger("beitv2.engine")


# torch.compile pays off once its warm-up (tens of seconds on a GPU, more for ViT-B) is spread over enough steps.
# On CPU the warm-up (Inductor's C++ build) has not been shown to pay back within a run here, so auto leaves CPU
# runs eager; `train.compile true` still compiles them.
COMPILE_AUTO_MIN_STEPS = 200
_COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,
                                                     torch._inductor.exc.InductorError)


def resolve_compile(setting: bool | None, device: torch.device, steps: int) -> bool:
    """`TrainConfig.compile`: True / False as given; None (auto) compiles on CUDA when the run has at least
    `COMPILE_AUTO_MIN_STEPS` steps left, and never on CPU."""
    if setting is not None:
        return setting
    return device.type == "cuda" and steps >= COMPILE_AUTO_MIN_STEPS


def compile_task(task: nn.Module, net: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the trained module and the task's frozen helpers (`TrainTask.helper_fns`); returns the
    compiled module. Inductor's graph cache goes to ``~/.cache/beitv2/inductor`` unless TORCHINDUCTOR_CACHE_DIR is set,
    so a second run (or a resume) of the same model skips most of the warm-up."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # not chosen by the user
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "beitv2" / "inductor")
    compiled = torch.compile(net)
    helpers = {name: torch.compile(fn) for name, fn in task.helper_fns().items()}
    task.wrap(compiled, helpers)
    return compiled


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped before the optimizer step, nothing was saved for it."""


@dataclass
class FitResult:
    status: str  # "finished", "stopped" (stop_after_steps) or "interrupted" (signal)
    global_step: int
    checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0  # 128 + signal number when interrupted (the shell convention)


def _images_in(batch: dict) -> int:
    for key in ("image", "tokenizer_image"):
        if key in batch:
            return int(batch[key].shape[0])
    return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])


def _to_device(batch: dict, device: torch.device, spec: dict[str, ImageSpec]) -> dict:
    """The batch on the device, its uint8 images converted there (the data set's ``batch_spec``)."""
    return prepare_batch({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()},
                         spec)


def _batch_spec(dataset: Dataset | None) -> dict[str, ImageSpec]:
    return dict(getattr(dataset, "batch_spec", None) or {}) if dataset is not None else {}


def stop_workers(it: Any) -> None:
    """End a DataLoader iterator's worker processes now (a no-op for a loader without workers, or twice).

    A failing run must not leave this to garbage collection: the traceback keeps the iterator alive until the
    interpreter exits, and at exit multiprocessing stops the workers with SIGTERM, which they ignore
    (`distributed.worker_ignores_stop_signals`), so the process would wait for them forever. Workers that do not
    stop within the loader's own grace period (one busy in a slow read) are killed."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    finally:
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()
                w.join(timeout=5)


class _OnDevice:
    """A loader whose batches arrive on the device and prepared, for a task's `evaluate` (its own ``.to(device)``
    is then a no-op). `close` ends the workers of the pass under way."""

    def __init__(self, loader: DataLoader, device: torch.device, spec: dict[str, ImageSpec]):
        self.loader, self.device, self.spec = loader, device, spec
        self.it: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.close()
        self.it = iter(self.loader)
        for batch in self.it:
            yield _to_device(batch, self.device, self.spec)

    def close(self) -> None:
        stop_workers(self.it)
        self.it = None


class _StopFlag:
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


class _DeviceMetrics:
    """An epoch's per-step metrics kept on the device: `add` never syncs; `read_last` / `epoch_sums` read them (one
    transfer) at check points. ``first_bad`` is the first step with a non-finite loss since the epoch start (-1)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[str] = []
        self.last: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        if self.last is not None and keys != self.keys:
            raise RuntimeError(f"the task's metrics changed between steps: {self.keys} -> {keys}")
        self.keys, self.last = keys, values
        self.sums = values.double() if self.sums is None else self.sums + values.double()

    def flag_non_finite(self, finite: torch.Tensor, step: int, loss: torch.Tensor) -> None:
        new = (finite < 1) & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_loss = torch.where(new, loss.float(), self.bad_loss)

    def read_last(self) -> dict[str, float]:
        return dict(zip(self.keys, self.last.tolist())) if self.last is not None else {}

    def epoch_sums(self) -> dict[str, float]:
        return dict(zip(self.keys, self.sums.tolist())) if self.sums is not None else {}


@dataclass
class _Epoch:
    """One epoch's running state in `Trainer._run`: where it starts and ends, the step metrics kept on the device,
    counters for the log, and the micro-batches of the step being accumulated."""

    epoch: int
    first: int  # first micro-batch index (a resumed epoch skips the ones done)
    used: int  # micro-batches that make whole steps
    acc: _DeviceMetrics
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


class Trainer:
    """Trains ``task.model``; its kind and config (`beitv2.models.registry`) are what checkpoints record.

    Hooks instead of patching from outside: ``optimizer(model, optim_cfg)`` builds the optimizer (default: AdamW
    over `build_optimizer`'s groups; its groups may carry ``lr_scale`` / ``apply_wd`` for the schedules), and every
    callable in ``after_step`` runs after each applied optimizer step (e.g. an EMA update).
    """

    def __init__(self, task: nn.Module, train_set: Dataset, cfg: TrainConfig, optim_cfg: OptimConfig, *,
                 dist: D.DistInfo, run_config: Any = None, val_set: Dataset | None = None, collate_fn=None,
                 num_workers: int = 0, optimizer: OptimizerFactory | None = None,
                 after_step: Sequence[Callable[[], None]] = ()):
        self.task, self.cfg, self.ocfg, self.dist = task, cfg, optim_cfg, dist
        self.train_set, self.val_set, self.collate_fn = train_set, val_set, collate_fn
        # uint8 images become float on the device, once per batch (see beitv2.data.transforms)
        self.train_spec, self.val_spec = _batch_spec(train_set), _batch_spec(val_set)
        self.model_kind, self.run_config = kind_of(task.model).name, run_config
        self.out = Path(cfg.output_dir)
        self.num_workers = num_workers
        self.device = dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda" and cfg.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls; autocast ops are bf16/fp16 anyway
        self.task.to(self.device)

        # a stream (WebDataset shards) has no sampler: it is told each epoch how many batches to make (`StreamPlan`)
        self.sampler: ResumableSampler | None = None
        self.persistent = False
        if isinstance(train_set, IterableDataset):
            num_images = int(getattr(train_set, "num_samples", 0))
            if num_images <= 0:
                raise ConfigError("data.num_samples: a streamed training set needs its epoch length (samples over "
                                  "all processes)")
            per_rank = num_images // dist.world_size
        else:
            num_images = len(train_set)
            # persistent workers (no worker start-up per epoch) where the data set takes (epoch, index) pairs
            self.persistent = num_workers > 0 and bool(getattr(train_set, "epoch_indexable", False))
            self.sampler = ResumableSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                            seed=cfg.seed, drop_last=True, with_epoch=self.persistent)
            per_rank = len(self.sampler)
        self.micro_per_epoch = per_rank // cfg.batch_size
        self.steps_per_epoch = self.micro_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size: {num_images} training images over {dist.world_size} process(es)"
                              f" give no full step of batch_size={cfg.batch_size} x accum_steps={cfg.accum_steps}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.total_batch = cfg.batch_size * cfg.accum_steps * dist.world_size
        # official VQ-KD: lr *= total_batch / 128, min_lr unscaled (capped at lr for small batches)
        lr = optim_cfg.lr * (self.total_batch / optim_cfg.lr_reference_batch if optim_cfg.lr_reference_batch else 1)
        warm = warmup_iterations(self.total_steps, self.steps_per_epoch, optim_cfg.warmup_epochs,
                                 optim_cfg.warmup_steps)
        self.lr_schedule = lr_schedule(optim_cfg.schedule, lr, min(optim_cfg.min_lr, lr), self.total_steps, warm,
                                       optim_cfg.poly_power, optim_cfg.warmup_ratio)
        wd_end = optim_cfg.weight_decay if optim_cfg.weight_decay_end is None else optim_cfg.weight_decay_end
        self.wd_schedule = cosine_schedule(optim_cfg.weight_decay, wd_end, self.total_steps, 0)
        self.optimizer = (optimizer or build_optimizer)(task.model, optim_cfg)
        for hook in after_step:  # runs only when the step was applied (a GradScaler may skip one)
            self.optimizer.register_step_post_hook(lambda *_, hook=hook: hook())
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = grad_scaler(self.device, self.precision)
        self.global_step = 0
        self.net: nn.Module = task.model
        self._train_iter: Any = None  # the training loader's iterator, whose workers a failing run stops

    # ------------------------------------------------------------------------------------------------ set-up
    def _loader(self, dataset: Dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        # A private generator keeps the loader from drawing on the global torch RNG, so a resumed run's RNG stream
        # matches an uninterrupted one; the data's own randomness is a function of (seed, epoch, index). It is
        # seeded seed + rank (as the official code seeds each rank), so no two ranks' workers share a stream.
        gen = torch.Generator().manual_seed(self.cfg.seed + self.dist.rank)
        persistent = sampler is not None and sampler is self.sampler and self.persistent
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, drop_last=drop_last, pin_memory=self.device.type == "cuda",
                          generator=gen, worker_init_fn=D.worker_ignores_stop_signals if self.num_workers else None,
                          persistent_workers=persistent)

    def _resume(self) -> Path | None:
        ckpt = None
        if self.dist.is_main:
            ckpt = S.find_resume(self.out, self.cfg.resume)
        ckpt = D.broadcast_object(str(ckpt) if ckpt else None)
        if ckpt is None:
            D.seed_everything(self.cfg.seed + self.dist.rank)
            return None
        ckpt = Path(ckpt)
        S.load_weights(self.task.model, ckpt)
        st = S.load_train_state(ckpt)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.global_step = int(st["global_step"])
        if st.get("steps_per_epoch") != self.steps_per_epoch:
            log.warning("resuming with %d steps per epoch (checkpoint: %s); the data order differs from the "
                        "original run", self.steps_per_epoch, st.get("steps_per_epoch"))
        rngs = st.get("rng", [])
        if len(rngs) == self.dist.world_size:
            S.set_rng_state(rngs[self.dist.rank])
            cuda_seed = D.cuda_seed_for_resume(rngs[self.dist.rank], self.device.type, self.cfg.seed,
                                               self.dist.rank, self.global_step)
            if cuda_seed is not None:
                torch.cuda.manual_seed(cuda_seed)
        else:
            log.warning("world size changed (%d -> %d): re-seeding instead of restoring RNG states", len(rngs),
                        self.dist.world_size)
            D.seed_everything(self.cfg.seed + self.dist.rank + self.global_step)
        return ckpt

    def _wrap(self) -> None:
        net: nn.Module = self.task.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers need a per-forward broadcast only when the forward changes them and ranks may disagree (batch
            # norm running stats); our ViTs hold constant index buffers and the quantizer all-reduces its own state
            running_stats = any(getattr(m, "track_running_stats", False) for m in net.modules())
            net = DDP(net, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters,
                      broadcast_buffers=running_stats, gradient_as_bucket_view=True)
        self.eager_net = net
        self.compiled = resolve_compile(self.cfg.compile, self.device, self.total_steps - self.global_step)
        if self.device.type == "cpu":  # the frozen helpers run forward only, where SDPA wins: left as they are
            unfuse_short_cpu_attention(net, compiled=self.compiled)
        if self.compiled:
            net = compile_task(self.task, net, self.device)
        else:
            self.task.wrap(net)
        self.net = net

    def _forward_backward(self, batch: dict, accum: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch. The first compiled call compiles (reported as the warm-up); a compile failure falls back
        to eager for the rest of the run with a warning."""
        first = self.compiled and not getattr(self, "_compile_ok", False)
        t = time.perf_counter()
        try:
            with autocast(self.device, self.precision):
                loss, metrics = self.task(batch)
            self.scaler.scale(loss / accum).backward()
        except _COMPILE_ERRORS as e:
            if not first:
                raise
            log.warning("torch.compile failed (%s: %s); training eagerly (train.compile false skips compiling)",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.optimizer.zero_grad(set_to_none=True)
            self.compiled = False
            self.net = self.eager_net
            self.task.wrap(self.eager_net)
            return self._forward_backward(batch, accum)
        if first:
            self._compile_ok = True
            self.logger.info(f"torch.compile warm-up: the first micro-batch took {time.perf_counter() - t:.1f} s")
        return loss, metrics

        # ----------------------------------------------------------------------------------------------- checkpoint
    def save(self) -> Path | None:
        """Collective: every rank contributes its RNG state; rank 0 writes ``ckpt-<global_step>``."""
        rngs = D.all_gather_object(S.rng_state())
        path = None
        if self.dist.is_main:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            st = {"global_step": self.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                  "steps_per_epoch": self.steps_per_epoch, "accum_steps": self.cfg.accum_steps,
                  "total_steps": self.total_steps, "world_size": self.dist.world_size,
                  "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                  "config": to_dict(self.run_config) if self.run_config is not None else {}}
            path = S.save_checkpoint(self.out, self.global_step, self.task.model, st, self.cfg.keep_last)
        D.barrier()
        return path

    # ------------------------------------------------------------------------------------------------ training
    def fit(self) -> FitResult:
        cfg = self.cfg
        if self.dist.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                if self.run_config is not None:
                    save_yaml(self.run_config, self.out / "config.yaml")
            except OSError as e:
                raise ConfigError(f"train.output_dir: cannot write to {self.out} ({write_failure(e, self.out)})"
                                  ) from None
        D.barrier()
        resumed = self._resume()
        self._wrap()
        loader = self._loader(self.train_set, self.sampler, cfg.batch_size, drop_last=True)
        self.logger = RunLogger(self.out, self.dist.is_main, self.total_steps, self.global_step, cfg.progress,
                                cfg.tensorboard, wandb_project=cfg.wandb, wandb_entity=cfg.wandb_entity,
                                wandb_run_name=cfg.wandb_run_name, resumed=resumed is not None,
                                run_config=to_dict(self.run_config) if self.run_config is not None else None)
        self.logger.info(f"training {self.model_kind}: {self.total_steps} steps ({cfg.epochs} epochs x "
                         f"{self.steps_per_epoch}), total batch {self.total_batch}, precision {self.precision}, "
                         f"world size {self.dist.world_size}" + (f", resumed from {resumed}" if resumed else ""))
        last_ckpt = resumed
        exit_code, preempted = 1, False  # what the W&B run records if the loop raises
        with _StopFlag() as stop:  # also over the clean-up of a failed run: a launcher's SIGTERM must not cut it
            try:
                result = self._run(loader, stop)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: aborted without saving
                    exit_code = 128 + signal.SIGINT
                stop_workers(self._train_iter)
                try:  # the error that ended the run is the one to report, not a second one while closing the logs
                    self.logger.close(exit_code, preempted)
                except Exception as close_error:
                    log.warning("closing the run's logs failed too: %s", close_error)
                raise
            if result.status == "interrupted":
                result.exit_code = 128 + (stop.signum or signal.SIGTERM)
        exit_code, preempted = result.exit_code, result.status == "interrupted"
        stop_workers(self._train_iter)
        self._train_iter = None
        self.logger.close(exit_code, preempted)
        last_ckpt = result.checkpoint or last_ckpt
        if self.dist.enabled:
            self._check_rank_sync()
        if result.status == "finished" and self.dist.is_main:
            from ..checkpoint import save_model

            path = self.out / "model.safetensors"
            try:
                save_model(path, self.task.model)
            except Exception as e:
                kept = f"; the last checkpoint, {last_ckpt}, holds the same weights" if last_ckpt else ""
                raise S.WriteError(f"could not write {path}: {write_failure(e, self.out)}{kept}") from e
        D.barrier()
        result.checkpoint = last_ckpt
        return result

    def _check_rank_sync(self) -> None:
        """All ranks must hold identical weights (incl. buffers such as an EMA codebook); record the digests."""
        h = hashlib.sha256()
        for k, v in sorted(self.task.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests = D.all_gather_object(h.hexdigest())
        if self.dist.is_main:
            in_sync = len(set(digests)) == 1
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"type": "rank_sync", "step": self.global_step, "in_sync": in_sync,
                                    "digests": digests}) + "\n")
            if not in_sync:
                log.warning("model weights differ between ranks: %s", digests)

    def _run(self, loader: DataLoader, stop: _StopFlag) -> FitResult:
        """The loop: epochs of steps, each step `accum_steps` micro-batches, a checkpoint at every epoch's end."""
        if self.cfg.stop_after_steps and self.global_step >= self.cfg.stop_after_steps:
            self.logger.info(f"already at step {self.global_step} >= train.stop_after_steps; nothing to do")
            return FitResult("stopped", self.global_step, None, {})
        start_epoch, start_step = divmod(self.global_step, self.steps_per_epoch)
        ckpt, last = None, {}
        for epoch in range(start_epoch, self.cfg.epochs):
            ep = self._start_epoch(epoch, first=start_step * self.cfg.accum_steps if epoch == start_epoch else 0)
            status = self._train_epoch(loader, stop, ep)
            last = ep.last or last
            ckpt = self._close_epoch(ep, status)
            if status != "finished":
                self.logger.info(f"{status} at step {self.global_step}; checkpoint {ckpt}")
                return FitResult(status, self.global_step, ckpt, last)
        return FitResult("finished", self.global_step, ckpt, last)

    def _start_epoch(self, epoch: int, first: int) -> _Epoch:
        """Point the data at ``epoch`` from micro-batch ``first`` on (a resumed epoch skips what was done)."""
        cfg = self.cfg
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        used = self.micro_per_epoch - self.micro_per_epoch % cfg.accum_steps  # whole steps only
        if self.sampler is None:
            self.train_set.set_plan(StreamPlan(self.dist.rank, self.dist.world_size, cfg.batch_size, used, first))
        else:
            self.sampler.set_epoch(epoch)
            self.sampler.set_skip(first * cfg.batch_size)
        self.task.train()
        self.task.on_epoch_start(epoch)
        return _Epoch(epoch, first, used, _DeviceMetrics(self.device))

    def _train_epoch(self, loader: DataLoader, stop: _StopFlag, ep: _Epoch) -> str:
        """The epoch's steps; "finished", or "stopped" / "interrupted" when the run ends inside it."""
        accum = self.cfg.accum_steps
        it = iter(loader)  # persistent workers: the same iterator every epoch
        if self._train_iter is not it:
            stop_workers(self._train_iter)  # the last epoch's, stopped early (a partial last step is not drawn)
        self._train_iter = it
        try:
            for i, batch in enumerate(self._train_iter, start=ep.first):
                if i >= ep.used:
                    break
                self._micro_step(ep, i, batch)
                if i % accum < accum - 1:
                    continue  # accumulate gradients
                self._apply_step(ep)
                status = self._check_point(ep, stop, i)
                if status is not None:
                    return status
        except RuntimeError as e:  # a second Ctrl-C (KeyboardInterrupt) aborts without saving
            if isinstance(e, NonFiniteLossError) or not stop.signum or self.dist.enabled:
                raise  # several ranks: the others may be inside a step's collective; no save can be agreed
            # the loader's workers died of the same Ctrl-C (they ignore it; a custom loader may not): the state
            # is that of the last finished step
            self.optimizer.zero_grad(set_to_none=True)
            return "interrupted"
        return "finished"

    def _micro_step(self, ep: _Epoch, i: int, batch: dict) -> None:
        """Forward and backward of micro-batch ``i``; its loss and metrics stay on the device."""
        accum, m = self.cfg.accum_steps, i % self.cfg.accum_steps
        if m == 0:
            step = self.global_step
            set_schedule(self.optimizer, float(self.lr_schedule[step]), float(self.wd_schedule[step]))
            self.task.on_step_start(step)
        ep.skipped += int(batch.pop("num_skipped", 0))
        if not batch:
            raise RuntimeError(f"every image of batch {i} in epoch {ep.epoch} was unreadable (see the "
                               "skipped-file messages above); fix or remove those files")
        ep.img_log += _images_in(batch) * self.dist.world_size
        batch = _to_device(batch, self.device, self.train_spec)
        sync = self.eager_net.no_sync() if self.dist.enabled and m < accum - 1 else contextlib.nullcontext()
        with sync:
            loss, metrics = self._forward_backward(batch, accum)
        ep.finite = ep.finite * torch.isfinite(loss.detach()).float()
        ep.micro_loss.append(loss.detach().float())
        ep.micro_metrics.append({k: torch.as_tensor(v, device=self.device).detach().float()
                                 for k, v in metrics.items()})

    def _apply_step(self, ep: _Epoch) -> None:
        """The optimizer step over the accumulated micro-batches and the step's metrics, without reading the device:
        a non-finite step is skipped on the device (fused AdamW's found_inf) and reported at the next check point."""
        step_loss = torch.stack(ep.micro_loss).mean()
        ep.acc.flag_non_finite(ep.finite, self.global_step, step_loss)
        grad_norm = self._optimizer_step(skip=1 - ep.finite)
        self.global_step += 1
        ep.n_steps += 1
        keys = ["loss", *ep.micro_metrics[0], "grad_norm"]
        ep.acc.add(keys, torch.stack([step_loss]
                                     + [torch.stack([mm[k] for mm in ep.micro_metrics]).mean() for k in keys[1:-1]]
                                     + [grad_norm.float()]))
        ep.start_step()

    def _check_point(self, ep: _Epoch, stop: _StopFlag, i: int) -> str | None:
        """After a step: at a check point (a log line, a save, a stop check, the step limit, the epoch's last step)
        read the device once, log and save; the run's end status when it stops here, else None.

        Check points are the same steps on every rank (a function of the step and the config), so the all-reduce in
        `_check` is reached by all ranks or none; a signal seen by one rank only stops all of them at the next one."""
        cfg, step = self.cfg, self.global_step
        logging_now = step % cfg.log_every_steps == 0 or step == 1
        saving_now = bool(cfg.save_every_steps) and step % cfg.save_every_steps == 0
        limit = bool(cfg.stop_after_steps) and step >= cfg.stop_after_steps
        stop_check = bool(cfg.stop_check_every_steps) and step % cfg.stop_check_every_steps == 0
        local_stop = stop.signum > 0 and not self.dist.enabled  # DDP ranks agree at check points
        if not (logging_now or saving_now or limit or stop_check or local_stop or i + 1 >= ep.used):
            self.logger.progress(1, {})
            return None
        stopping = self._check(ep.acc, stop, ep.epoch, i)
        ep.last = ep.acc.read_last()
        self._log_step(ep.epoch, ep.last, ep.img_log, ep.t_log, ep.skipped, logging_now)
        if logging_now:
            ep.t_log, ep.img_log = time.perf_counter(), 0
        if stopping or limit:
            return "interrupted" if stopping else "stopped"
        if saving_now:
            self.save()
        return None

    def _close_epoch(self, ep: _Epoch, status: str) -> Path | None:
        """The epoch record when the epoch is complete (and validation), then a checkpoint."""
        end = (ep.epoch + 1) * self.steps_per_epoch
        if status == "finished" and self.global_step < end:
            raise RuntimeError(f"the training data ran out in epoch {ep.epoch} at step {self.global_step} of {end}")
        if self.global_step == end:
            self._end_epoch(ep.epoch, ep.acc.epoch_sums(), ep.n_steps, ep.skipped)
        return self.save()

    @property
    def step_skips_on_device(self) -> bool:
        """Whether a non-finite step can be skipped without reading the loss on the host: fused AdamW and SGD take a
        ``found_inf`` tensor (fp16's GradScaler skips non-finite gradients by itself). Other optimizers apply it;
        the run still stops at the next check point, before any checkpoint is written."""
        return self.scaler.is_enabled() or bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _optimizer_step(self, skip: torch.Tensor) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.ocfg.clip_grad if self.ocfg.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm)
        if not self.scaler.is_enabled() and self.step_skips_on_device:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip  # 1 = leave weights and state as they are
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def _check(self, acc: _DeviceMetrics, stop: _StopFlag, epoch: int, batch_index: int) -> bool:
        """A check point (one host sync, one all-reduce): raise on a non-finite loss since the last check, and agree
        over ranks on a signal-requested stop."""
        flags = D.all_reduce_sum(torch.stack([(acc.first_bad >= 0).float(),
                                              torch.tensor(float(stop.signum > 0), device=self.device)]))
        bad, stopping = flags.tolist()
        if bad > 0:
            first_bad, bad_loss = int(acc.first_bad), float(acc.bad_loss)
            where = (f"step {first_bad} (loss {bad_loss})" if first_bad >= 0 else
                     f"a step up to {self.global_step - 1} on another rank")
            applied = ("the non-finite step was not applied" if self.step_skips_on_device else
                       "this optimizer cannot skip a step on the device, so the weights in memory took it")
            raise NonFiniteLossError(
                f"non-finite loss at {where}, seen at the check after step {self.global_step} (epoch {epoch}, "
                f"batch {batch_index}); {applied} and no checkpoint was written after it. "
                f"Lower optim.lr, set optim.clip_grad or use train.precision fp32.")
        return stopping > 0

    def _log_step(self, epoch: int, metrics: dict[str, float], images: int, t0: float, skipped: int,
                  record: bool) -> None:
        if not self.dist.is_main:
            return
        dt = max(time.perf_counter() - t0, 1e-9)
        ips = images / dt
        acc = {k: v for k, v in metrics.items() if "acc" in k}
        self.logger.progress(1, {"loss": metrics["loss"], **acc, "img/s": ips})
        if record:
            lr = max(g["lr"] for g in self.optimizer.param_groups)
            rec = {"lr": lr, "wd": float(self.wd_schedule[self.global_step - 1]), **metrics, "images_per_s": ips,
                   "skipped_images": skipped}
            if self.scaler.is_enabled():
                rec["loss_scale"] = self.scaler.get_scale()
            self.logger.write("step", self.global_step, epoch, rec)

    def _end_epoch(self, epoch: int, sums: dict[str, float], n_steps: int, skipped: int) -> None:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [n_steps, skipped], dtype=torch.float64, device=self.device)
        t = D.all_reduce_sum(t).tolist()
        avg = {k: v / max(t[-2], 1) for k, v in zip(keys, t)}
        avg["skipped_images"] = int(t[-1])
        avg.update(self.task.epoch_metrics())
        self.logger.write("epoch", self.global_step, epoch, avg)
        if avg["skipped_images"]:
            self.logger.info(f"epoch {epoch}: skipped {avg['skipped_images']} unreadable image(s) (the "
                             "'skipping unreadable image' warnings above name them)")
        if self.val_set is not None and self.cfg.eval_every_epochs and (epoch + 1) % self.cfg.eval_every_epochs == 0:
            val = self.evaluate()
            self.logger.write("val", self.global_step, epoch, val)
            self.logger.info(f"epoch {epoch} val: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's validation pass over ``val_set``.

        Ranks see disjoint parts (every image once; a DistributedSampler would pad with repeats) and may see
        different numbers of batches, so the task reduces its sums once after its loop and runs the bare model:
        the DDP forward broadcasts buffers, a collective every rank would have to reach per batch.
        """
        val = self.val_set
        if self.dist.enabled and not isinstance(val, IterableDataset):
            val = Subset(val, range(self.dist.rank, len(val), self.dist.world_size))
        bs = max(1, int(1.5 * self.cfg.batch_size))  # the official eval batch
        batches = _OnDevice(self._loader(val, None, bs, drop_last=False), self.device, self.val_spec)
        loader: Any = batches
        if self.cfg.progress and self.dist.is_main:  # a pass over a large split takes minutes: show it
            from tqdm.auto import tqdm

            loader = tqdm(batches, desc="validation", unit="batch", leave=False, dynamic_ncols=True,
                          total=len(loader) if not isinstance(val, IterableDataset) else None)
        self.task.eval()
        try:
            with self.task.unwrapped():
                return self.task.evaluate(loader, self.device, lambda: autocast(self.device, self.precision))
        finally:
            batches.close()  # its workers, also when the pass failed
            if loader is not batches:
                loader.close()
            self.task.train()
