"""Training checkpoints: one directory per checkpoint, written atomically, and the auto-resume search.

Layout of ``output_dir``::

    ckpt-<global_step>/model.safetensors   weights + model config (``beitv2.checkpoint.save_model``)
    ckpt-<global_step>/train_state.pt      optimizer, scaler, global step, next (epoch, step_in_epoch), RNG states,
                                           config
    latest                                 text file naming the newest checkpoint directory

A checkpoint is assembled in ``.tmp-ckpt-<step>-<pid>`` and renamed into place (``os.replace``), so a directory named
``ckpt-*`` is always complete; a killed process leaves only a temporary directory, which resume ignores and the next
save removes. A save that fails (a full disk, an unwritable folder, Ctrl-C) removes its temporary directory and, for
an error, raises `WriteError`, leaving every earlier checkpoint as it was. ``train_state.pt`` holds only tensors and
plain Python values and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils.files import atomic_write_text, write_failure

WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
LATEST = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class WriteError(RuntimeError):
    """A checkpoint or model file could not be written (a full disk, an unwritable folder); the message says why and
    what was kept. Nothing half-written is left behind."""


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
    from ..checkpoint import save_model

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
    from ..checkpoint import load_state_dict

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
