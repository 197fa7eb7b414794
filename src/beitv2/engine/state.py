"""Training checkpoints: one directory per checkpoint, written atomically, the auto-resume search, and the
`Checkpointer` that saves and resumes a run (weights, optimizer, loss scaler, step, every process's RNG states).

Layout of ``output_dir``::

    ckpt-<global_step>/model.safetensors   weights + model config (``beitv2.checkpoint.save_model``)
    ckpt-<global_step>/train_state.pt      optimizer, scaler, global step, next (epoch, step_in_epoch), RNG states,
                                           config
    latest                                 text file naming the newest checkpoint directory
    model.safetensors                      the finished run's weights

A checkpoint is assembled in ``.tmp-ckpt-<step>-<pid>`` and renamed into place (``os.replace``), so a directory named
``ckpt-*`` is always complete; a killed process leaves only a temporary directory, which resume ignores and the next
save removes. A save that fails (a full disk, an unwritable folder, Ctrl-C) removes its temporary directory and, for
an error, raises `WriteError`, leaving every earlier checkpoint as it was. ``train_state.pt`` holds only tensors and
plain Python values and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_state_dict, save_model
from ..config import to_dict
from ..utils.files import WriteError, atomic_write_text, write_failure
from . import distributed as D

log = logging.getLogger("beitv2.engine")
__all__ = ["Checkpointer", "WriteError", "find_resume", "list_checkpoints", "load_train_state", "rng_state",
           "save_checkpoint", "set_rng_state"]

WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
LATEST = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / STATE).is_file()


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    if not Path(out_dir).is_dir():
        return []
    found = []
    for p in Path(out_dir).iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(out_dir: Path, resume: str) -> Path | None:
    """``none`` -> None; a path -> that checkpoint; ``auto`` -> the newest complete checkpoint in ``out_dir``."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (needs {WEIGHTS}, {STATE})")
        return path
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, train_state: dict, keep_last: int) -> Path:
    """Write ``ckpt-<step>`` atomically, point ``latest`` at it and delete all but the newest ``keep_last``."""
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step}"
    tmp = out_dir / f".tmp-ckpt-{step}-{os.getpid()}"
    complete = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp / WEIGHTS, model)
        with open(tmp / STATE, "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. epoch end right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = True
        atomic_write_text(out_dir / LATEST, final.name + "\n")
    except BaseException as e:  # a full disk, an unwritable folder, Ctrl-C: no partial checkpoint stays behind
        reason = write_failure(e, out_dir) if isinstance(e, Exception) else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if not reason:
            if complete:  # Ctrl-C right after the rename: `latest` still names the complete checkpoint
                with contextlib.suppress(Exception):
                    atomic_write_text(out_dir / LATEST, final.name + "\n")
            raise
        found = list_checkpoints(out_dir)
        kept = f"the last complete checkpoint, {found[-1][1]}, is kept" if found else "no earlier checkpoint exists"
        raise WriteError(f"could not write checkpoint {final}: {reason}; {kept}") from e
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in out_dir.glob(".tmp-ckpt-*"):  # debris of crashed writers
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into an existing model, strictly."""
    model.load_state_dict(load_state_dict(path), strict=True)


def load_train_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """All global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and resumes one training run. `resume` and `save` are collective (every process calls them); rank 0
    reads and writes the files.

    What makes a resumed run step-exact: the weights, the optimizer and loss-scaler state, the global step (from
    which the loop finds its epoch and micro-batch) and each process's RNG states. The data's own randomness is a
    function of (seed, epoch, index) and needs no state."""

    def __init__(self, out: Path, dist: D.DistInfo, *, resume: str, seed: int, keep_last: int, run_config: Any):
        self.out, self.dist, self.resume_from, self.seed, self.keep_last = Path(out), dist, resume, seed, keep_last
        self.run_config = run_config  # recorded in every checkpoint

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               steps_per_epoch: int) -> tuple[Path | None, int]:
        """(the checkpoint resumed from, its global step), or (None, 0) for a fresh run, which seeds every RNG from
        ``seed + rank``. A different world size restores no RNG state (there is one per process): it re-seeds."""
        ckpt = find_resume(self.out, self.resume_from) if self.dist.is_main else None
        ckpt = D.broadcast_object(str(ckpt) if ckpt else None)
        rank = self.dist.rank
        if ckpt is None:
            D.seed_everything(self.seed + rank)
            return None, 0
        ckpt = Path(ckpt)
        load_weights(model, ckpt)
        st = load_train_state(ckpt)
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        step = int(st["global_step"])
        if st.get("steps_per_epoch") != steps_per_epoch:
            log.warning("resuming with %d steps per epoch (checkpoint: %s); the data order differs from the "
                        "original run", steps_per_epoch, st.get("steps_per_epoch"))
        rngs = st.get("rng", [])
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[rank])
            cuda_seed = D.cuda_seed_for_resume(rngs[rank], self.dist.device.type, self.seed, rank, step)
            if cuda_seed is not None:
                torch.cuda.manual_seed(cuda_seed)
        else:
            log.warning("world size changed (%d -> %d): re-seeding instead of restoring RNG states", len(rngs),
                        self.dist.world_size)
            D.seed_everything(self.seed + rank + step)
        return ckpt, step

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
             global_step: int, steps_per_epoch: int, accum_steps: int, total_steps: int) -> Path | None:
        """Every rank contributes its RNG state; rank 0 writes ``ckpt-<global_step>`` (its path; None elsewhere)."""
        rngs = D.all_gather_object(rng_state())
        path = None
        if self.dist.is_main:
            epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
            st = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                  "steps_per_epoch": steps_per_epoch, "accum_steps": accum_steps, "total_steps": total_steps,
                  "world_size": self.dist.world_size, "optimizer": optimizer.state_dict(),
                  "scaler": scaler.state_dict(), "rng": rngs,
                  "config": to_dict(self.run_config) if self.run_config is not None else {}}
            path = save_checkpoint(self.out, global_step, model, st, self.keep_last)
        D.barrier()
        return path

    def save_final(self, model: nn.Module, last_checkpoint: Path | None) -> None:
        """The finished run's ``model.safetensors`` (rank 0)."""
        if self.dist.is_main:
            path = self.out / WEIGHTS
            try:
                save_model(path, model)
            except Exception as e:
                kept = f"; the last checkpoint, {last_checkpoint}, holds the same weights" if last_checkpoint else ""
                raise WriteError(f"could not write {path}: {write_failure(e, self.out)}{kept}") from e
        D.barrier()

    def record_rank_sync(self, model: nn.Module, global_step: int) -> None:
        """Collective: all ranks must hold identical weights (incl. buffers such as an EMA codebook); rank 0 records
        every rank's digest in ``metrics.jsonl`` and warns when they differ."""
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests = D.all_gather_object(h.hexdigest())
        if self.dist.is_main:
            in_sync = len(set(digests)) == 1
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"type": "rank_sync", "step": global_step, "in_sync": in_sync,
                                    "digests": digests}) + "\n")
            if not in_sync:
                log.warning("model weights differ between ranks: %s", digests)
