"""Atomic file writes: a temporary file in the target's folder, fsync'ed, then renamed over the target, so a reader
(or a crash) never sees a half-written file, and a failed write (a full disk) leaves the previous file as it was.

Files are created with the permissions any ordinary ``open`` would give them (``0o666`` less the umask), so outputs
on shared storage are as readable as the user's umask allows; `tempfile.mkstemp` alone would make them ``0o600``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(RuntimeError):
    """A checkpoint, model or log file could not be written (a full disk, an unwritable folder); the message says why
    and what was kept. Nothing half-written is left behind."""


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux ``/proc``); elsewhere it is
    set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created regular file gets: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)``, then atomically rename the temporary file to ``path``. ``suffix`` lets writers that
    pick the format from the file name (matplotlib) see the right extension. On any failure (a full disk, Ctrl-C)
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # after the writer, which may itself replace the file (safetensors does)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_failure(e: BaseException, folder: str | Path) -> str:
    """Why writing into ``folder`` failed, in words: the OS error in ``e``'s chain when there is one, else (libraries
    such as torch.save report a full disk as a bare "unexpected pos") the free space left on ``folder``'s file
    system when it is nearly full, else ``e``'s own message."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno) if seen.errno != errno.ENOSPC else "no space left on the device"
        seen = seen.__cause__ or seen.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "No space left" in str(e) or "StorageFull" in str(e):
        return "no space left on the device"
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return text
    if usage.free < max(1 << 20, usage.total // 1000):  # call this before removing the partial file
        return f"no space left on the device ({usage.free // 1024} KiB free; {text})"
    return text
