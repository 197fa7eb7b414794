"""Training tasks: thin modules turning a batch into ``(loss, metrics)`` for `beitv2.engine.Trainer`.

A task holds the trainable ``model`` (optimised, saved, wrapped in DDP / torch.compile by the trainer, which passes
the wrapped module back through `wrap`) and frozen helpers (teacher, tokenizer) that stay in eval mode, outside DDP
and outside the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .engine import distributed as D
from .mim_targets import MIMTarget
from .utils.distributed import all_reduce_sum


class TrainTask(nn.Module):
    """Base: ``model`` is trained; modules listed in ``frozen`` are kept in eval mode without gradients."""

    frozen: tuple[str, ...] = ()
    progress_metrics: dict[str, str] = {}  # step metric -> its label on the progress bar (besides loss and acc*)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._net: list[nn.Module] = []
        self._helpers: dict[str, Callable] = {}
        self.step = 0

    @property
    def net(self) -> nn.Module:
        """The module to call in forward: the DDP / compiled wrapper when the trainer set one."""
        return self._net[0] if self._net else self.model

    def wrap(self, net: nn.Module, helpers: dict[str, Callable] | None = None) -> None:
        """Set the module `forward` calls (DDP / compiled) and, optionally, compiled versions of `helper_fns`."""
        self._net = [net]
        self._helpers = dict(helpers or {})

    def helper_fns(self) -> dict[str, Callable]:
        """The frozen helpers' calls made in `forward` (what the trainer compiles beside the model)."""
        return {name: getattr(self, name).forward for name in self.frozen}

    def helper(self, name: str) -> Callable:
        """The (compiled, when the trainer compiled it) call of frozen helper ``name``."""
        fn = self._helpers.get(name)
        return fn if fn is not None else self.helper_fns()[name]

    @contextlib.contextmanager
    def unwrapped(self):
        """Forward through the bare model (validation: no DDP buffer broadcast, a per-batch collective)."""
        saved, self._net = self._net, []
        try:
            yield self
        finally:
            self._net = saved

    def freeze(self) -> None:
        for name in self.frozen:
            m = getattr(self, name)
            m.eval()
            m.requires_grad_(False)

    def train(self, mode: bool = True) -> TrainTask:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        self.step = step

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, loader, device: torch.device, autocast: Callable) -> dict[str, float]:
        """Mean of the task's metrics over ``loader``. No collective inside the loop (ranks may see different
        numbers of batches, or skip an unreadable one): the sums are all-reduced once at the end."""
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            batch.pop("num_skipped", None)
            if not any(torch.is_tensor(v) for v in batch.values()):
                continue
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                loss, metrics = self(batch)
            b = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
        return _mean_over_ranks(sums, n, device)


def _mean_over_ranks(sums: dict[str, float], n: int, device: torch.device) -> dict[str, float]:
    """Sums / image count over all ranks, plus ``images``; a rank that saw no batch still takes part."""
    keys = sorted(set().union(*D.all_gather_object(sorted(sums))))
    t = torch.tensor([sums.get(k, 0.0) for k in keys] + [n], dtype=torch.float64, device=device)
    t = all_reduce_sum(t).tolist()
    return {**{k: v / max(t[-1], 1) for k, v in zip(keys, t)}, "images": int(t[-1])}


class TokenizerTask(TrainTask):
    """VQ-KD: reconstruct the frozen teacher's features of the same [0, 1] view through the codebook."""

    frozen = ("teacher",)
    progress_metrics = {"batch_codes_used": "codes"}  # the codebook's health while it trains

    def __init__(self, vqkd: nn.Module, teacher: nn.Module):
        super().__init__(vqkd)
        self.teacher = teacher
        self.freeze()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        images = batch["tokenizer_image"]
        with torch.no_grad():
            target = self.helper("teacher")(images)
        return self.net(images, target)

    def on_epoch_start(self, epoch: int) -> None:
        self.model.quantize.reset_usage()  # official: cluster usage is zeroed at every epoch start

    def epoch_metrics(self) -> dict[str, float]:
        return {f"codebook_{k}": v for k, v in self.model.quantize.usage_stats().items()}

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, autocast: Callable) -> dict[str, float]:
        """Teacher cosine similarity, losses and codebook health on the validation split (no autocast, as the
        official `evaluate`). Training-time usage counts are saved and restored around the pass; the pass's counts
        are kept per rank and all-reduced once after the loop (ranks may see different numbers of batches)."""
        q = self.model.quantize
        saved = q.usage_counts.clone()
        q.reset_usage()
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            batch.pop("num_skipped", None)
            if "tokenizer_image" not in batch:
                continue
            images = batch["tokenizer_image"].to(device, non_blocking=True)
            target = self.teacher(images)
            loss, metrics = self.model(images, target)
            q.record_usage(self.model.tokenize(images), reduce=False)
            b = images.shape[0]
            for k in ("rec_loss", "quant_loss", "teacher_cos"):
                sums[k] = sums.get(k, 0.0) + float(metrics[k]) * b
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * b
            n += b
        out = _mean_over_ranks(sums, n, device)
        all_reduce_sum(q.usage_counts)
        out.update({f"codebook_{k}": v for k, v in q.usage_stats().items()})
        q.usage_counts.copy_(saved)
        return out


class DVAETask(TrainTask):
    """BEiT v1's dVAE: pixel reconstruction with a Gumbel-softmax temperature annealed by global step."""

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.net(batch["tokenizer_image"], step=self.step)
        metrics = {k: float(v) for k, v in metrics.items() if k != "loss"}
        return loss, metrics


class MIMTask(TrainTask):
    """Masked image modeling against a pre-training target (`mim_targets`: tokenizer codes, pixels or teacher
    features): the target labels every patch of its view, the model predicts and scores the masked ones
    (`BEiTv2ForMIM.forward` and `BEiTv2ForMIM.loss`)."""

    frozen = ("target",)

    def __init__(self, mim_model: nn.Module, target: MIMTarget):
        super().__init__(mim_model)
        self.target = target
        self.freeze()

    def helper_fns(self) -> dict[str, Callable]:
        return {"target": self.target.per_patch} if self.target.frozen_net else {}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        # the data's index of the masked positions when it ships one: static shapes, no host sync
        mask = batch["mask_index"] if "mask_index" in batch else batch["mask"]
        with torch.no_grad():
            per_patch = self.helper("target") if self.target.frozen_net else self.target.per_patch
            targets = per_patch(batch[self.target.view])
        return self.model.loss(self.net(batch["image"], mask), targets, mask)
