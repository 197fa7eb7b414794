"""The one training loop every command uses, written in the order it runs.

A *task* (``beitv2.tasks``) is an ``nn.Module`` holding the trainable ``model`` plus any frozen helpers (teacher,
tokenizer) and mapping a batch to ``(loss, metrics)``. The trainer owns everything else: DDP, autocast, gradient
accumulation and clipping, the per-step lr/wd schedules, logging, atomic checkpoints, step-granular resume, graceful
stop on SIGTERM/SIGINT, and a clear error on a non-finite loss. What it knows about its data is a
`beitv2.data.samples.TrainingData`, stated by the data set or the caller.

`Trainer.fit` reads top to bottom; the methods below it follow in the order they first run: set-up (output folder,
wrapping), the loop (`_run` -> per epoch `_start_epoch`, `_train_epoch`, `_close_epoch`; per micro-batch
`_micro_step`; per step `_apply_step`, `_check_point`), then the end of an epoch (`_end_epoch`, `evaluate`, `save`)
and of the run (`_finish`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..config import ConfigError, save_yaml, to_dict
from ..data.samples import TrainingData, training_data
from ..models.registry import kind_of
from ..utils.distributed import all_reduce_sum
from ..utils.files import write_failure
from . import distributed as D
from .compiling import (
    COMPILE_AUTO_MIN_STEPS,
    COMPILE_ERRORS,
    compile_task,
    data_parallel,
    prepare_attention,
    resolve_compile,
)
from .config import OptimConfig, TrainConfig
from .loaders import DeviceBatches, epoch_sampler, images_in, make_loader, start_epoch, stop_workers, to_device
from .logger import RunLogger
from .loop import DeviceMetrics, EpochState, FitResult, NonFiniteLossError, StopFlag
from .optim import OptimizerFactory, build_optimizer, set_schedule
from .precision import autocast, grad_scaler, resolve_precision, step_scaler
from .schedule import cosine_schedule, lr_schedule, warmup_iterations
from .state import Checkpointer

__all__ = ["COMPILE_AUTO_MIN_STEPS", "FitResult", "NonFiniteLossError", "Trainer", "resolve_compile", "stop_workers"]

log = logging.getLogger("beitv2.engine")


class Trainer:
    """Trains ``task.model``; its kind and config (`beitv2.models.registry`) are what checkpoints record.

    ``train_set`` / ``val_set``: a `TrainingData`, or a data set that states one (a
    `beitv2.data.samples.TrainingSource`: the sample wrappers of `beitv2.data`), or any other map-style data set of
    float batches. Hooks instead of patching from outside: ``optimizer(model, optim_config)`` builds the optimizer
    (default: AdamW over `build_optimizer`'s groups; its groups may carry ``lr_scale`` / ``apply_wd`` for the
    schedules), and every callable in ``after_step`` runs after each applied optimizer step (e.g. an EMA update).
    """

    def __init__(self, task: nn.Module, train_set: TrainingData | Dataset, config: TrainConfig,
                 optim_config: OptimConfig, *, dist: D.DistInfo, run_config: Any = None,
                 val_set: TrainingData | Dataset | None = None, collate_fn=None, num_workers: int = 0,
                 optimizer: OptimizerFactory | None = None, after_step: Sequence[Callable[[], None]] = ()):
        # what is trained, where and how
        self.task, self.config, self.optim_config, self.dist = task, config, optim_config, dist
        self.device = dist.device
        self.precision = resolve_precision(config.precision, self.device)
        if self.device.type == "cuda" and config.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls; autocast ops are bf16/fp16 anyway
        self.task.to(self.device)
        self.model_kind, self.run_config, self.out = kind_of(task.model).name, run_config, Path(config.output_dir)

        # the data: its contract, the sampler (none for a stream) and the epoch's size in micro-batches and steps
        self.data = training_data(train_set)
        self.val = training_data(val_set) if val_set is not None else None
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.sampler, self.persistent, per_rank = epoch_sampler(self.data, dist, config.seed, num_workers)
        self.micro_per_epoch = per_rank // config.batch_size
        self.steps_per_epoch = self.micro_per_epoch // config.accum_steps
        if self.steps_per_epoch < 1:
            images = self.data.num_samples if self.data.streamed else len(self.data.dataset)
            raise ConfigError(f"train.batch_size: {images} training images over {dist.world_size} process(es)"
                              f" give no full step of batch_size={config.batch_size} x accum_steps="
                              f"{config.accum_steps}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.total_batch = config.batch_size * config.accum_steps * dist.world_size

        # the optimisation: per-step schedules, the optimizer, the loss scaler (fp16) and the step's scaler
        # official VQ-KD: lr *= total_batch / 128, min_lr unscaled (capped at lr for small batches)
        oc = optim_config
        lr = oc.lr * (self.total_batch / oc.lr_reference_batch if oc.lr_reference_batch else 1)
        warm = warmup_iterations(self.total_steps, self.steps_per_epoch, oc.warmup_epochs, oc.warmup_steps)
        self.lr_schedule = lr_schedule(oc.schedule, lr, min(oc.min_lr, lr), self.total_steps, warm, oc.poly_power,
                                       oc.warmup_ratio)
        wd_end = oc.weight_decay if oc.weight_decay_end is None else oc.weight_decay_end
        self.wd_schedule = cosine_schedule(oc.weight_decay, wd_end, self.total_steps, 0)
        self.optimizer = (optimizer or build_optimizer)(task.model, oc)
        for hook in after_step:  # runs only when the step was applied (a GradScaler may skip one)
            self.optimizer.register_step_post_hook(lambda *_, hook=hook: hook())
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = grad_scaler(self.device, self.precision)
        self.step_scaler = step_scaler(self.scaler, self.optimizer, self.device)
        self.checkpointer = Checkpointer(self.out, dist, resume=config.resume, seed=config.seed,
                                         keep_last=config.keep_last, run_config=run_config)

        # the run's state, set by `fit`
        self.global_step = 0
        self.eager_net: nn.Module = task.model  # under DDP when several processes train
        self.net: nn.Module = task.model  # what the task calls: eager_net, compiled or not
        self.compiled = False
        self.compile_ok = False  # the first compiled micro-batch ran
        self.logger: RunLogger | None = None
        self.train_iter: Any = None  # the training loader's iterator, whose workers a failing run stops

    def fit(self) -> FitResult:
        self._prepare_output()
        resumed, self.global_step = self.checkpointer.resume(self.task.model, self.optimizer, self.scaler,
                                                             self.steps_per_epoch)
        self._wrap()
        loader = make_loader(self.data.dataset, self.sampler, self.config.batch_size, drop_last=True,
                             seed=self.config.seed, rank=self.dist.rank, device=self.device,
                             num_workers=self.num_workers, collate_fn=self.collate_fn, persistent=self.persistent)
        cfg = self.config
        self.logger = RunLogger(self.out, self.dist.is_main, self.total_steps, self.global_step, cfg.progress,
                                cfg.tensorboard, wandb_project=cfg.wandb, wandb_entity=cfg.wandb_entity,
                                wandb_run_name=cfg.wandb_run_name, resumed=resumed is not None,
                                run_config=to_dict(self.run_config) if self.run_config is not None else None)
        self.logger.info(f"training {self.model_kind}: {self.total_steps} steps ({cfg.epochs} epochs x "
                         f"{self.steps_per_epoch}), total batch {self.total_batch}, precision {self.precision}, "
                         f"world size {self.dist.world_size}" + (f", resumed from {resumed}" if resumed else ""))
        exit_code, preempted = 1, False  # what the W&B run records if the loop raises
        with StopFlag() as stop:  # also over the clean-up of a failed run: a launcher's SIGTERM must not cut it
            try:
                result = self._run(loader, stop)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: aborted without saving
                    exit_code = 128 + signal.SIGINT
                stop_workers(self.train_iter)
                try:  # the error that ended the run is the one to report, not a second one while closing the logs
                    self.logger.close(exit_code, preempted)
                except Exception as close_error:
                    log.warning("closing the run's logs failed too: %s", close_error)
                raise
            if result.status == "interrupted":
                result.exit_code = 128 + (stop.signum or signal.SIGTERM)
        stop_workers(self.train_iter)
        self.train_iter = None
        self.logger.close(result.exit_code, result.status == "interrupted")
        result.checkpoint = result.checkpoint or resumed
        self._finish(result)
        return result

    # ------------------------------------------------------------------------------------------------- set-up
    def _prepare_output(self) -> None:
        """The output folder and its ``config.yaml`` (rank 0); an unwritable folder is a configuration error."""
        if self.dist.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                if self.run_config is not None:
                    save_yaml(self.run_config, self.out / "config.yaml")
            except OSError as e:
                raise ConfigError(f"train.output_dir: cannot write to {self.out} ({write_failure(e, self.out)})"
                                  ) from None
        D.barrier()

    def _wrap(self) -> None:
        self.eager_net = data_parallel(self.task.model, self.dist, self.config.find_unused_parameters)
        self.compiled = resolve_compile(self.config.compile, self.device, self.total_steps - self.global_step)
        prepare_attention(self.eager_net, self.device, self.compiled)
        if self.compiled:
            self.net = compile_task(self.task, self.eager_net, self.device)
        else:
            self.net = self.eager_net
            self.task.wrap(self.eager_net)

    # --------------------------------------------------------------------------------------------------- loop
    def _run(self, loader: DataLoader, stop: StopFlag) -> FitResult:
        """Epochs of steps, each step `accum_steps` micro-batches, a checkpoint at every epoch's end."""
        if self.config.stop_after_steps and self.global_step >= self.config.stop_after_steps:
            self.logger.info(f"already at step {self.global_step} >= train.stop_after_steps; nothing to do")
            return FitResult("stopped", self.global_step, None, {})
        start_epoch_index, start_step = divmod(self.global_step, self.steps_per_epoch)
        ckpt, last = None, {}
        for epoch in range(start_epoch_index, self.config.epochs):
            ep = self._start_epoch(epoch, first=start_step * self.config.accum_steps
                                   if epoch == start_epoch_index else 0)
            status = self._train_epoch(loader, stop, ep)
            last = ep.last or last
            ckpt = self._close_epoch(ep, status)
            if status != "finished":
                self.logger.info(f"{status} at step {self.global_step}; checkpoint {ckpt}")
                return FitResult(status, self.global_step, ckpt, last)
        return FitResult("finished", self.global_step, ckpt, last)

    def _start_epoch(self, epoch: int, first: int) -> EpochState:
        """Point the data at ``epoch`` from micro-batch ``first`` on (a resumed epoch skips what was done)."""
        accum = self.config.accum_steps
        used = self.micro_per_epoch - self.micro_per_epoch % accum  # whole steps only
        start_epoch(self.data, self.sampler, self.dist, epoch, self.config.batch_size, used, first)
        self.task.train()
        self.task.on_epoch_start(epoch)
        return EpochState(epoch, first, used, DeviceMetrics(self.device))

    def _train_epoch(self, loader: DataLoader, stop: StopFlag, ep: EpochState) -> str:
        """The epoch's steps; "finished", or "stopped" / "interrupted" when the run ends inside it."""
        accum = self.config.accum_steps
        it = iter(loader)  # persistent workers: the same iterator every epoch
        if self.train_iter is not it:
            stop_workers(self.train_iter)  # the last epoch's, stopped early (a partial last step is not drawn)
        self.train_iter = it
        try:
            for i, batch in enumerate(self.train_iter, start=ep.first):
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

    def _micro_step(self, ep: EpochState, i: int, batch: dict) -> None:
        """Forward and backward of micro-batch ``i``; its loss and metrics stay on the device."""
        accum, m = self.config.accum_steps, i % self.config.accum_steps
        if m == 0:
            step = self.global_step
            set_schedule(self.optimizer, float(self.lr_schedule[step]), float(self.wd_schedule[step]))
            self.task.on_step_start(step)
        ep.skipped += int(batch.pop("num_skipped", 0))
        if not batch:
            raise RuntimeError(f"every image of batch {i} in epoch {ep.epoch} was unreadable (see the "
                               "skipped-file messages above); fix or remove those files")
        ep.img_log += images_in(batch) * self.dist.world_size
        batch = to_device(batch, self.device, dict(self.data.batch_spec))
        sync = self.eager_net.no_sync() if self.dist.enabled and m < accum - 1 else contextlib.nullcontext()
        with sync:
            loss, metrics = self._forward_backward(batch, accum)
        ep.finite = ep.finite * torch.isfinite(loss.detach()).float()
        ep.micro_loss.append(loss.detach().float())
        ep.micro_metrics.append({k: torch.as_tensor(v, device=self.device).detach().float()
                                 for k, v in metrics.items()})

    def _forward_backward(self, batch: dict, accum: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch. The first compiled call compiles (reported as the warm-up); a compile failure falls back
        to eager for the rest of the run with a warning."""
        first = self.compiled and not self.compile_ok
        t = time.perf_counter()
        try:
            with autocast(self.device, self.precision):
                loss, metrics = self.task(batch)
            self.scaler.scale(loss / accum).backward()
        except COMPILE_ERRORS as e:
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
            self.compile_ok = True
            self.logger.info(f"torch.compile warm-up: the first micro-batch took {time.perf_counter() - t:.1f} s")
        return loss, metrics

    def _apply_step(self, ep: EpochState) -> None:
        """The optimizer step over the accumulated micro-batches and the step's metrics, without reading the device:
        a step with non-finite gradients is skipped on the device where the optimizer can (`step_skips_on_device`),
        and a non-finite loss or gradient norm is reported at the next check point."""
        step_loss = torch.stack(ep.micro_loss).mean()
        grad_norm = self._optimizer_step()
        # fp16's loss scaler meets non-finite gradients as a matter of course (it lowers its scale): the loss decides
        finite = ep.finite if self.scaler.is_enabled() else ep.finite * torch.isfinite(grad_norm).float()
        ep.acc.flag_non_finite(finite, self.global_step, step_loss, grad_norm)
        self.global_step += 1
        ep.n_steps += 1
        keys = ["loss", *ep.micro_metrics[0], "grad_norm"]
        ep.acc.add(keys, torch.stack([step_loss]
                                     + [torch.stack([mm[k] for mm in ep.micro_metrics]).mean() for k in keys[1:-1]]
                                     + [grad_norm.float()]))
        ep.start_step()

    def _optimizer_step(self) -> torch.Tensor:
        """Unscale (fp16) and clip the gradients, step (`precision.step_scaler`), zero them; the gradient norm."""
        scaler = self.step_scaler
        scaler.unscale_(self.optimizer)
        max_norm = self.optim_config.clip_grad if self.optim_config.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm)
        scaler.step(self.optimizer)
        scaler.update(None if scaler is self.scaler else 1.0)  # the step's own scaler stays at scale 1
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @property
    def step_skips_on_device(self) -> bool:
        """Whether a step with non-finite gradients is skipped without reading the device: fp16's loss scaler, and
        fused optimizers (AdamW, SGD) through a scaler at scale 1. Other optimizers apply it; the run still stops at
        the next check point, before any checkpoint is written."""
        return self.step_scaler.is_enabled()

    def _check_point(self, ep: EpochState, stop: StopFlag, i: int) -> str | None:
        """After a step: at a check point (a log line, a save, a stop check, the step limit, the epoch's last step)
        read the device once, log and save; the run's end status when it stops here, else None.

        Check points are the same steps on every rank (a function of the step and the config), so the all-reduce in
        `_check` is reached by all ranks or none; a signal seen by one rank only stops all of them at the next one."""
        cfg, step = self.config, self.global_step
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

    def _check(self, acc: DeviceMetrics, stop: StopFlag, epoch: int, batch_index: int) -> bool:
        """A check point (one host sync, one all-reduce): raise on a non-finite loss since the last check, and agree
        over ranks on a signal-requested stop."""
        flags = all_reduce_sum(torch.stack([(acc.first_bad >= 0).float(),
                                              torch.tensor(float(stop.signum > 0), device=self.device)]))
        bad, stopping = flags.tolist()
        if bad > 0:
            where = (acc.bad_step() if int(acc.first_bad) >= 0 else
                     f"non-finite loss or gradients at a step up to {self.global_step - 1} on another rank")
            applied = ("steps with non-finite gradients were not applied" if self.step_skips_on_device else
                       "this optimizer cannot skip a step on the device, so the weights in memory took it")
            raise NonFiniteLossError(
                f"{where}, seen at the check after step {self.global_step} (epoch {epoch}, batch {batch_index}); "
                f"{applied} and no checkpoint was written after it. "
                f"Lower optim.lr, set optim.clip_grad or use train.precision fp32.")
        return stopping > 0

    def _log_step(self, epoch: int, metrics: dict[str, float], images: int, t0: float, skipped: int,
                  record: bool) -> None:
        if not self.dist.is_main:
            return
        dt = max(time.perf_counter() - t0, 1e-9)
        ips = images / dt
        shown = {k: v for k, v in metrics.items() if "acc" in k}
        shown.update({label: metrics[k] for k, label in self.task.progress_metrics.items() if k in metrics})
        self.logger.progress(1, {"loss": metrics["loss"], **shown, "img/s": ips})
        if record:
            lr = max(g["lr"] for g in self.optimizer.param_groups)
            rec = {"lr": lr, "wd": float(self.wd_schedule[self.global_step - 1]), **metrics, "images_per_s": ips,
                   "skipped_images": skipped}
            if self.scaler.is_enabled():
                rec["loss_scale"] = self.scaler.get_scale()
            self.logger.write("step", self.global_step, epoch, rec)

    # ---------------------------------------------------------------------------------------- end of an epoch
    def _close_epoch(self, ep: EpochState, status: str) -> Path | None:
        """The epoch record when the epoch is complete (and validation), then a checkpoint."""
        end = (ep.epoch + 1) * self.steps_per_epoch
        if status == "finished" and self.global_step < end:
            raise RuntimeError(f"the training data ran out in epoch {ep.epoch} at step {self.global_step} of {end}")
        if self.global_step == end:
            self._end_epoch(ep.epoch, ep.acc.epoch_sums(), ep.n_steps, ep.skipped)
        return self.save()

    def _end_epoch(self, epoch: int, sums: dict[str, float], n_steps: int, skipped: int) -> None:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [n_steps, skipped], dtype=torch.float64, device=self.device)
        t = all_reduce_sum(t).tolist()
        avg = {k: v / max(t[-2], 1) for k, v in zip(keys, t)}
        avg["skipped_images"] = int(t[-1])
        avg.update(self.task.epoch_metrics())
        self.logger.write("epoch", self.global_step, epoch, avg)
        if avg["skipped_images"]:
            self.logger.info(f"epoch {epoch}: skipped {avg['skipped_images']} unreadable image(s) (the "
                             "'skipping unreadable image' warnings above name them)")
        if self.val is not None and self.config.eval_every_epochs and (epoch + 1) % self.config.eval_every_epochs == 0:
            val = self.evaluate()
            self.logger.write("val", self.global_step, epoch, val)
            self.logger.info(f"epoch {epoch} val: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's validation pass over the validation set.

        Ranks see disjoint parts (every image once; a DistributedSampler would pad with repeats) and may see
        different numbers of batches, so the task reduces its sums once after its loop and runs the bare model:
        the DDP forward broadcasts buffers, a collective every rank would have to reach per batch.
        """
        val = self.val.dataset
        if self.dist.enabled and not isinstance(val, IterableDataset):
            val = Subset(val, range(self.dist.rank, len(val), self.dist.world_size))
        bs = max(1, int(1.5 * self.config.batch_size))  # the official eval batch
        loader = make_loader(val, None, bs, drop_last=False, seed=self.config.seed, rank=self.dist.rank,
                             device=self.device, num_workers=self.num_workers, collate_fn=self.collate_fn)
        batches = DeviceBatches(loader, self.device, dict(self.val.batch_spec))
        shown: Any = batches
        if self.config.progress and self.dist.is_main:  # a pass over a large split takes minutes: show it
            from tqdm.auto import tqdm  # deferred: only a shown pass needs it

            shown = tqdm(batches, desc="validation", unit="batch", leave=False, dynamic_ncols=True,
                         total=len(batches) if not isinstance(val, IterableDataset) else None)
        self.task.eval()
        try:
            with self.task.unwrapped():
                return self.task.evaluate(shown, self.device, lambda: autocast(self.device, self.precision))
        finally:
            batches.close()  # its workers, also when the pass failed
            if shown is not batches:
                shown.close()
            self.task.train()

    def save(self) -> Path | None:
        """Collective: ``ckpt-<global_step>`` (`state.Checkpointer.save`)."""
        return self.checkpointer.save(self.task.model, self.optimizer, self.scaler, global_step=self.global_step,
                                      steps_per_epoch=self.steps_per_epoch, accum_steps=self.config.accum_steps,
                                      total_steps=self.total_steps)

    # ------------------------------------------------------------------------------------------ end of the run
    def _finish(self, result: FitResult) -> None:
        """Record whether the ranks hold the same weights, then write a finished run's ``model.safetensors``."""
        if self.dist.enabled:
            self.checkpointer.record_rank_sync(self.task.model, self.global_step)
        if result.status == "finished":
            self.checkpointer.save_final(self.task.model, result.checkpoint)
        else:
            D.barrier()
