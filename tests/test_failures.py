"""Every failure ends the process: real `beitv2 train-tokenizer` processes with 2 data-loader workers each, made to
fail the ways a run fails in practice (a disk filling up, a second Ctrl-C, SIGTERM, an error inside a loader worker,
an unwritable output folder, a failing rank of a 2-process torchrun job). Each must exit promptly with a non-zero
code and a one-line message last on stderr (no traceback), leave no process of its own behind (loader workers
included) and keep its last complete checkpoint loadable, with no half-written file beside it.

The single-process scenarios run at the same time (a thread each drives one process), so the file's wall time is
about that of the slowest one. Disk-full scenarios mount a small tmpfs (root only) and fill it once the first
checkpoint is written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import write_fmnist

from beitv2.checkpoint import load_model, save_model
from beitv2.engine import state as S
from beitv2.engine.logger import RunLogger
from beitv2.engine.state import WriteError
from beitv2.models.backbone import BEiTViT, ViTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
LIMIT = 240  # s per process: a loaded 2-core machine is slow; a hang is caught long before pytest-timeout
VQKD_CFG = {"encoder": {"img_size": [28], "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 1,
                        "num_heads": 2},
            "decoder_depth": 1, "quantizer": {"num_codes": 64, "code_dim": 8}, "teacher_dim": 32}
TEACHER = {"kind": "timm", "name_or_path": "vit_tiny_patch16_224", "random_init": True,
           "model_kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def config(tmp: Path, name: str, out: Path, data: dict, **train) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "tokenizer": {"type": "vqkd", "vqkd": VQKD_CFG}, "teacher": TEACHER,
        "data": {"channels": 1, "num_workers": 2, **data},
        "optim": {"lr": 1e-3, "lr_reference_batch": 0, "warmup_epochs": 0},
        "train": {"epochs": 3, "batch_size": 8, "log_every_steps": 1, "progress": False, "tensorboard": False,
                  "device": "cpu", "precision": "fp32", "output_dir": str(out), **train}}))
    return path


# ------------------------------------------------------------------------------------------------ process watching

def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, session id, start time) of a process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def live_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every process that is not a zombie."""
    found = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None and st[0] != "Z":
            found[int(d)] = st[1:]
    return found


def family(root: int, known: dict[int, int]) -> dict[int, int]:
    """pid -> start time of ``root``'s live processes: its descendants, the members of its session (orphans stay
    there) and those of its descendants' sessions (torchrun starts each rank in a session of its own), plus any
    process in ``known`` still alive with the same start time."""
    procs = live_processes()
    found = {pid: procs[pid][2] for pid, t in known.items() if pid in procs and procs[pid][2] == t}
    if root in procs:
        found[root] = procs[root][2]
    grew = True
    while grew:
        grew = False
        sessions = set(found)
        for pid, (ppid, sid, start) in procs.items():
            if pid not in found and (ppid in found or sid in sessions or sid == root):
                found[pid] = start
                grew = True
    return found


@dataclass
class Outcome:
    code: int
    stderr: str
    seen: dict[int, int]  # every process of the session seen while it ran (pid -> start time)
    survivors: dict[int, int]
    after_trigger_s: float  # from the signal / the disk filling up to the exit
    notes: list[str] = field(default_factory=list)

    @property
    def last_line(self) -> str:
        return self.stderr.rstrip("\n").rsplit("\n", 1)[-1]

    def workers_seen(self, main_pids: int = 1) -> int:
        return len(self.seen) - main_pids


class Watched:
    """A `beitv2` process in its own session, its stderr in a file, its processes sampled until it exits."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, **(env or {})}
        env.pop("BEITV2_TRACEBACK", None)
        with open(log, "w") as f:
            self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f, env=env, start_new_session=True)
        self.seen: dict[int, int] = {}
        self.t_trigger = time.monotonic()

    def sample(self) -> None:
        self.seen.update(family(self.p.pid, self.seen))

    def until(self, cond: Callable[[], bool], timeout: float = LIMIT) -> bool:
        """Sample until ``cond()`` holds (True) or the process has ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample()
            if cond():
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.03)
        return False

    def signal(self, sig: int) -> None:
        self.t_trigger = time.monotonic()
        try:
            os.kill(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = LIMIT) -> Outcome:
        if not self.until(lambda: False, timeout) and self.p.poll() is None:
            hung = family(self.p.pid, self.seen)
            for pid in hung:
                os.kill(pid, signal.SIGKILL)
            self.p.wait()
            return Outcome(-9, self.log.read_text() + f"\n[test: still running after {timeout} s: {sorted(hung)}]",
                           self.seen, hung, timeout)
        code = self.p.wait()
        elapsed = time.monotonic() - self.t_trigger
        time.sleep(0.5)  # a worker that outlives the main process does so by far longer than this
        survivors = family(self.p.pid, self.seen)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        return Outcome(code, self.log.read_text(), self.seen, survivors, elapsed)


def beitv2(*args: str) -> list[str]:
    return [sys.executable, "-m", "beitv2.cli", *args]


def has_step(out: Path) -> bool:
    f = out / "metrics.jsonl"
    return f.is_file() and '"type": "step"' in f.read_text()


def has_checkpoint(out: Path) -> bool:
    return bool(S.list_checkpoints(out)) if out.is_dir() else False


def fill(mount: Path) -> None:
    """Write a ballast file until the file system has no room left."""
    with open(mount / "ballast", "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def mount_tmpfs(path: Path, size: str, *options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited (or read-only) tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    return path


# ------------------------------------------------------------------------------------------------ the scenarios

def sigterm(tmp: Path, data: dict) -> tuple[Outcome, Path]:
    out = tmp / "term"
    w = Watched(beitv2("train-tokenizer", "--config", str(config(tmp, "term", out, data))), tmp / "term.err")
    assert w.until(lambda: has_step(out)), w.log.read_text()
    w.signal(signal.SIGTERM)
    return w.finish(), out


def ctrl_c_twice(tmp: Path, data: dict) -> tuple[Outcome, Path]:
    out = tmp / "int"
    w = Watched(beitv2("train-tokenizer", "--config", str(config(tmp, "int", out, data, save_every_steps=2))),
                tmp / "int.err")
    assert w.until(lambda: has_checkpoint(out) and len(w.seen) >= 3), w.log.read_text()
    w.signal(signal.SIGINT)
    o = w.until(lambda: "Ctrl-C again" in w.log.read_text(), 30)
    w.signal(signal.SIGINT)  # while the run finishes its step and saves: the abort path, unless it was quicker
    result = w.finish()
    result.notes.append("second Ctrl-C reached a running process" if o else "the run ended before the second Ctrl-C")
    return result, out


def disk_full(tmp: Path, data: dict, mount: Path, log_every_steps: int) -> tuple[Outcome, Path]:
    """The file system fills up after the first checkpoint: the next write fails (with ``log_every_steps`` large,
    a checkpoint's: a metrics line may still fit in the last page of its file)."""
    out = mount / "run"
    cfg = config(tmp, mount.name, out, data, save_every_steps=2, log_every_steps=log_every_steps)
    w = Watched(beitv2("train-tokenizer", "--config", str(cfg)), tmp / f"{mount.name}.err")
    assert w.until(lambda: has_checkpoint(out)), w.log.read_text()
    fill(mount)
    w.t_trigger = time.monotonic()
    return w.finish(), out


def worker_error(tmp: Path, shard: Path) -> tuple[Outcome, Path]:
    """One shard with one sample read by 2 workers: worker 1's share is empty, which it reports by raising."""
    out = tmp / "wds"
    data = {"kind": "wds", "path": str(shard), "num_samples": 64}
    w = Watched(beitv2("train-tokenizer", "--config", str(config(tmp, "wds", out, data))), tmp / "wds.err")
    return w.finish(), out


def unwritable(tmp: Path, data: dict, folder: Path) -> tuple[Outcome, Path]:
    out = folder / "run"
    w = Watched(beitv2("train-tokenizer", "--config", str(config(tmp, "unwritable", out, data))),
                tmp / "unwritable.err")
    return w.finish(), out


def write_shard(path: Path) -> Path:
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="png")
    with tarfile.open(path, "w") as tar:
        for name, payload in (("0000.png", buf.getvalue()), ("0000.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Runs every single-process scenario at once, one thread each; name -> (Outcome, output folder) or the
    exception (a skip) the scenario raised."""
    tmp = tmp_path_factory.mktemp("failures")
    data = {"kind": "fmnist", "path": str(write_fmnist(tmp / "fmnist", n_train=64, n_test=16)), "subset": 64,
            "val_subset": 16}
    mounts: list[Path] = []

    def full(name: str, log_every_steps: int):
        mounts.append(mount_tmpfs(tmp / name, "8m"))
        return disk_full(tmp, data, mounts[-1], log_every_steps)

    def read_only():
        mounts.append(mount_tmpfs(tmp / "read_only", "1m", "ro"))
        return unwritable(tmp, data, mounts[-1])

    jobs = {"sigterm": lambda: sigterm(tmp, data), "ctrl_c_twice": lambda: ctrl_c_twice(tmp, data),
            "disk_full": lambda: full("full_ckpt", 1000),
            "worker_error": lambda: worker_error(tmp, write_shard(tmp / "one.tar")), "unwritable": read_only}
    results: dict[str, object] = {}

    def run(name, job):
        try:
            results[name] = job()
        except BaseException as e:  # a failed assert or a skip, re-raised by the test that reads it
            results[name] = e

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield results
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)


def outcome(outcomes: dict, name: str) -> tuple[Outcome, Path]:
    r = outcomes[name]
    if isinstance(r, BaseException):
        raise r
    return r


def assert_ended_cleanly(o: Outcome, code: int, workers: int = 2) -> None:
    """Exit ``code``, a one-line message last on stderr and no traceback, every process of the run gone (and the
    loader workers were there to be checked)."""
    assert o.code == code, o.stderr[-3000:]
    assert "Traceback" not in o.stderr, o.stderr[-3000:]
    assert o.last_line.strip() and not o.last_line.startswith(" "), o.stderr[-3000:]
    assert o.workers_seen() >= workers, (o.seen, o.stderr[-2000:])
    assert not o.survivors, f"processes left running: {o.survivors}"


def assert_last_checkpoint_loads(out: Path) -> Path:
    """The newest complete checkpoint loads (weights and train state), and nothing half-written lies beside it."""
    found = S.list_checkpoints(out)
    assert found, f"no complete checkpoint in {out}"
    ckpt = found[-1][1]
    model, kind, _ = load_model(ckpt / S.WEIGHTS)
    assert kind == "vqkd" and S.load_train_state(ckpt)["global_step"] == found[-1][0]
    debris = [p.name for p in out.rglob(".*") if p.name != ".gitkeep"]
    assert not debris, f"temporary files left: {debris}"
    assert (out / S.LATEST).read_text().strip() == ckpt.name
    return ckpt


# ------------------------------------------------------------------------------------------------ the tests

def test_sigterm_saves_a_checkpoint_and_ends_the_workers(outcomes):
    o, out = outcome(outcomes, "sigterm")
    assert_ended_cleanly(o, 128 + signal.SIGTERM)
    assert "interrupted after" in o.last_line
    step = assert_last_checkpoint_loads(out)
    assert step.name != "ckpt-24", "the run finished before the signal came"


def test_a_second_ctrl_c_aborts_without_a_traceback_or_a_hang(outcomes):
    o, out = outcome(outcomes, "ctrl_c_twice")
    assert_ended_cleanly(o, 128 + signal.SIGINT)
    if "second Ctrl-C reached" in o.notes[0] and "interrupted after" not in o.stderr:
        assert o.last_line.startswith("beitv2 train-tokenizer: interrupted (Ctrl-C): stopped without saving")
    assert_last_checkpoint_loads(out)


def test_disk_full_while_saving_keeps_the_last_checkpoint(outcomes):
    o, out = outcome(outcomes, "disk_full")
    assert_ended_cleanly(o, 1)
    assert o.last_line.startswith("beitv2 train-tokenizer: failed: could not write checkpoint"), o.last_line
    assert "no space left on the device" in o.last_line and "is kept" in o.last_line
    assert o.after_trigger_s < 60
    assert_last_checkpoint_loads(out)


def test_metrics_on_a_full_disk_raise_a_write_error_and_still_close(tmp_path):
    """A metrics line that finds the disk full says so in words; closing the logs afterwards closes the file even
    though its flush fails again."""
    mount = mount_tmpfs(tmp_path / "small_fs", "256k")
    try:
        logger = RunLogger(mount, enabled=True, total_steps=100, progress=False, tensorboard=False)
        logger.write("step", 1, 0, {"loss": 1.0})
        fill(mount)
        with pytest.raises(WriteError, match=r"could not write .*metrics.jsonl: no space left on the device"):
            for step in range(2, 100):  # the first lines may still fit in the file's last page
                logger.write("step", step, 0, {"loss": 1.0, "pad": "x" * 200})
        file = logger.file
        with contextlib.suppress(OSError):  # the line still buffered fails again
            logger.close(exit_code=1)
        assert file.closed and logger.file is None
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_error_in_a_loader_worker_ends_the_run(outcomes):
    o, _ = outcome(outcomes, "worker_error")
    assert_ended_cleanly(o, 1)
    assert o.last_line.startswith("beitv2 train-tokenizer: failed in data-loader worker 1: RuntimeError: WebDataset "
                                  "slot 1 of 2"), o.last_line


def test_an_unwritable_output_folder_is_one_line_exit_2(outcomes):
    """A read-only file system (writable for no one, root included) is refused before any work."""
    o, out = outcome(outcomes, "unwritable")
    assert_ended_cleanly(o, 2, workers=0)
    assert o.last_line == (f"beitv2 train-tokenizer: configuration error: train.output_dir: cannot write in "
                           f"{out.parent} (Read-only file system); choose another --train.output_dir"), o.last_line


# ------------------------------------------------------------------------------------------------ several ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_failing_on_a_full_disk_ends_the_torchrun_job(tmp_path):
    """Rank 0 (the only writer) runs out of disk space while rank 1 waits for it in the checkpoint's barrier: both
    ranks, their loader workers and torchrun end, each rank with one line."""
    mount = mount_tmpfs(tmp_path / "small_fs", "8m")
    try:
        data = {"kind": "fmnist", "path": str(write_fmnist(tmp_path / "fmnist", n_train=64, n_test=16)),
                "subset": 64, "val_subset": 0}
        out = mount / "run"
        cfg = config(tmp_path, "ranks", out, data, save_every_steps=2, log_every_steps=1000, dist_timeout_min=5,
                     batch_size=4)
        w = Watched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), "--redirects", "3", "--log-dir", str(tmp_path / "logs"), "-m", "beitv2.cli",
                     "train-tokenizer", "--config", str(cfg)], tmp_path / "torchrun.err")
        assert w.until(lambda: has_checkpoint(out)), w.log.read_text()
        fill(mount)
        w.t_trigger = time.monotonic()
        o = w.finish()
        ranks = {r: next((tmp_path / "logs").rglob(f"{r}/stderr.log")).read_text() for r in (0, 1)}
        assert o.code != 0 and not o.survivors, (o.survivors, o.stderr[-2000:], ranks)
        assert o.workers_seen(main_pids=3) >= 4, o.seen  # torchrun, 2 ranks and their workers
        for r, text in ranks.items():
            last = text.rstrip("\n").rsplit("\n", 1)[-1]
            assert "Traceback" not in text and last.startswith(f"[rank {r}] failed"), (r, text[-2000:])
            assert last.endswith("aborting the job"), last
        assert "could not write checkpoint" in ranks[0].rsplit("\n", 2)[-2] and "no space left" in ranks[0]
        assert o.after_trigger_s < 90
        assert_last_checkpoint_loads(out)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ------------------------------------------------------------------------------------------------ file modes

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, umask):
    """Files written atomically get 0o666 less the umask, like any other file the user creates (a bare mkstemp
    would make them 0o600, unreadable to colleagues on shared storage)."""
    torch.manual_seed(0)
    model = BEiTViT(ViTConfig(img_size=(16,), patch_size=8, embed_dim=16, depth=1, num_heads=2))
    old = os.umask(umask)
    try:
        save_model(tmp_path / "model.safetensors", model)
        ckpt = S.save_checkpoint(tmp_path / "run", 3, model, {"global_step": 3}, keep_last=2)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for f in (tmp_path / "model.safetensors", ckpt / S.WEIGHTS, ckpt / S.STATE, tmp_path / "run" / S.LATEST):
        assert f.stat().st_mode & 0o777 == want, (f, oct(f.stat().st_mode))
    assert (ckpt.stat().st_mode & 0o777) == 0o777 & ~umask
