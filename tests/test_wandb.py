"""Weights & Biases logging (`--train.wandb`), run for real in wandb's offline mode and read back from the run file.

An offline run is a folder ``offline-run-<time>-<id>`` holding ``run-<id>.wandb``: wandb's record log, a 7-byte
header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-log framed chunks (32 KiB blocks, each chunk
with a 7-byte header: crc32, length, type full/first/middle/last) of ``wandb_internal.Record`` protobufs. The reader
below uses wandb's own protobuf classes; a change of that format fails these tests loudly instead of passing them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import wandb  # in the dev extra
import yaml
from test_train_commands import FAST, TEACHER, TRAIN, VQKD, make_folder, write_yaml
from torch.utils.data import Dataset
from wandb.proto import wandb_internal_pb2 as pb

from beitv2.cli import main
from beitv2.engine import OptimConfig, TrainConfig, Trainer, init_distributed
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.tasks import TrainTask

BLOCK, HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    out, pos, buf = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + n], pos + HEADER + n
        buf = chunk if kind == 2 else buf + chunk
        if kind in (1, 4):  # full, or last of a split record
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def of_type(records: list, name: str) -> list:
    return [getattr(r, name) for r in records if r.WhichOneof("record_type") == name]


def history(records: list) -> list[dict]:
    """The rows logged with ``run.log``, without wandb's own ``_step`` / ``_runtime`` / ``_timestamp``."""
    rows = []
    for h in of_type(records, "history"):
        row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in h.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def expected_rows(out: Path) -> list[dict]:
    """What metrics.jsonl holds, as the W&B rows should carry it."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] in ("step", "epoch", "val"):
            rows.append({"global_step": rec["step"], "epoch": rec["epoch"],
                         **{f"{rec['type']}/{k}": v for k, v in rec.items()
                            if k not in ("type", "step", "epoch", "time") and isinstance(v, (int, float))}})
    return rows


def offline_runs(root: Path) -> list[Path]:
    """The offline run folders under ``root/wandb``, oldest first, once wandb's service has written them out (it
    may still hold the last records of a finished run in a buffer: `wandb.teardown` stops it)."""
    wandb.teardown()
    # oldest first by when each run's record file was last written (the runs here are sequential): the folder names
    # carry a timestamp of one-second resolution, so two runs of one second would otherwise sort by run id
    return sorted(root.glob("wandb/offline-run-*"), key=lambda r: run_file(r).stat().st_mtime_ns)


def run_id(run: Path) -> str:
    """The run id in an offline folder name ``offline-run-<time>-<id>``, with wandb's ``-N`` suffix for a second
    folder of the same id in the same second dropped."""
    m = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", run.name)
    assert m, run.name
    return m.group(1)


def run_file(run: Path) -> Path:
    [f] = run.glob("run-*.wandb")
    return f


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """wandb in offline mode, writing under tmp_path/wb, without console capture (pytest captures the output).
    wandb reads its environment once per process setup, so the set-up is torn down around each test."""
    wandb.teardown()
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_CONSOLE": "off",
                 "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    yield tmp_path / "wb"
    wandb.teardown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"), n_per_class=8)


def test_offline_run_logs_metrics_config_and_resumes_same_run(tmp_path, folder, offline):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "tok.yaml", {
        "tokenizer": {"type": "vqkd", "vqkd": VQKD}, "teacher": TEACHER,
        "data": {**FAST, "kind": "folder", "path": str(folder), "val_path": str(folder)},
        "optim": {"lr": 1e-3, "lr_reference_batch": 0, "warmup_epochs": 0.5},
        "train": {**TRAIN, "output_dir": str(out), "wandb_run_name": "tiny"}})
    # a time slice stopped after step 3, then resumed to the end: both slices are the same W&B run
    assert main(["train-tokenizer", "--config", str(cfg), "--train.wandb", "test",
                 "--train.stop_after_steps", "3"]) == 0
    run_id = (out / "wandb_run_id").read_text().strip()
    assert main(["train-tokenizer", "--config", str(cfg), "--train.wandb", "test"]) == 0
    assert wandb.run is None  # finished by the trainer, not left to wandb's exit hook
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = offline_runs(offline)
    # wandb names a run's folder offline-run-<start second>-<id>, with -1 appended when the resumed run starts in the
    # same second as the first one
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", r.name) for r in runs), runs
    records = [wandb_records(r / f"run-{run_id}.wandb") for r in runs]
    assert [of_type(rs, "run")[0].display_name for rs in records] == ["tiny", "tiny"]
    assert [of_type(rs, "run")[0].project for rs in records] == ["test", "test"]
    # every scalar that metrics.jsonl holds, with the same value, in the same order, nothing else
    logged = history(records[0]) + history(records[1])
    want = expected_rows(out)
    assert [r["global_step"] for r in want if "step/loss" in r] == list(range(1, 5))  # 16 images / 8, 2 epochs
    assert sum("val/teacher_cos" in r for r in want) == 2 and sum("epoch/loss" in r for r in want) == 2
    assert logged == want
    # the run's config is the resolved configuration (config.yaml)
    config = {i.key: json.loads(i.value_json) for i in of_type(records[0], "run")[0].config.update}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert config["optim"] == saved["optim"] and config["train"]["wandb"] == "test"
    assert config["tokenizer"]["vqkd"]["quantizer"]["num_codes"] == 64
    # each slice finished its W&B run with exit code 0
    assert [[e.exit_code for e in of_type(rs, "exit")] for rs in records] == [[0], [0]]


class Blobs(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 2, (32,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class FailingTask(TrainTask):
    """Raises (``crash``) or sends itself SIGTERM (``signal``) in step 2 (0-based)."""

    def __init__(self, model, mode: str):
        super().__init__(model)
        self.mode = mode

    def forward(self, batch):
        if self.step == 2 and self.mode == "crash":
            raise RuntimeError("the task failed at step 2")
        if self.step == 2 and self.mode == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(self.net(batch["image"]), batch["label"]), {}


def tiny_trainer(out: Path, mode: str = "", **train) -> Trainer:
    torch.manual_seed(0)
    model = BEiTViT(ViTConfig(img_size=(16,), patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2))
    cfg = TrainConfig(output_dir=str(out), epochs=1, batch_size=8, precision="fp32", progress=False,
                      tensorboard=False, log_every_steps=1, wandb="test", **train)
    cfg.validate("train.")
    return Trainer(FailingTask(model, mode), Blobs(), cfg, OptimConfig(warmup_epochs=0),
                   dist=init_distributed("cpu"))


def test_crash_finishes_the_run_as_failed(tmp_path, offline):
    """An exception in the loop: the W&B run still gets its exit record (as `run.finish` writes it), code 1."""
    with pytest.raises(RuntimeError, match="the task failed at step 2"):
        tiny_trainer(tmp_path / "run", "crash").fit()
    assert wandb.run is None
    [run] = offline_runs(offline)
    records = wandb_records(run_file(run))
    assert [e.exit_code for e in of_type(records, "exit")] == [1]
    assert not of_type(records, "preempting")
    assert [r["global_step"] for r in history(records)] == [1, 2]
    assert history(records) == expected_rows(tmp_path / "run")


def test_stop_signal_finishes_the_run_preempted_and_the_resume_continues_it(tmp_path, offline, monkeypatch):
    """SIGTERM: checkpoint, exit code 143 recorded and the run marked as preempting; the resumed training logs to
    the same run id; without WANDB_DIR the runs land in output_dir/wandb; `train.resume none` starts a new run."""
    monkeypatch.delenv("WANDB_DIR")
    out = tmp_path / "run"
    res = tiny_trainer(out, "signal").fit()
    assert res.status == "interrupted" and res.exit_code == 128 + signal.SIGTERM and res.global_step == 3
    first_id = (out / "wandb_run_id").read_text().strip()
    assert wandb.run is None
    assert tiny_trainer(out).fit().status == "finished"
    assert wandb.run is None and (out / "wandb_run_id").read_text().strip() == first_id
    assert tiny_trainer(out, resume="none").fit().status == "finished"
    new_id = (out / "wandb_run_id").read_text().strip()
    assert new_id != first_id
    runs = offline_runs(out)
    assert not offline.exists() and [run_id(r) for r in runs] == [first_id, first_id, new_id]
    records = [wandb_records(run_file(r)) for r in runs]
    assert [[e.exit_code for e in of_type(rs, "exit")] for rs in records] == [[143], [0], [0]]
    assert [len(of_type(rs, "preempting")) for rs in records] == [1, 0, 0]
    steps = [[r["global_step"] for r in history(rs) if "step/loss" in r] for rs in records]
    assert steps == [[1, 2, 3], [4], [1, 2, 3, 4]]
    assert history(records[0]) + history(records[1]) + history(records[2]) == expected_rows(out)


def test_missing_wandb_is_one_line_naming_the_option_before_any_compute(tmp_path, folder, monkeypatch, capsys):
    """`None` in sys.modules is how Python itself marks a module as not importable (ImportError on import)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "never"
    cfg = write_yaml(tmp_path / "tok.yaml", {"tokenizer": {"vqkd": VQKD}, "teacher": TEACHER,
                                             "data": {**FAST, "kind": "folder", "path": str(folder)},
                                             "train": {**TRAIN, "output_dir": str(out)}})
    assert main(["train-tokenizer", "--config", str(cfg), "--train.wandb", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["beitv2 train-tokenizer: configuration error: train.wandb: needs the wandb package: "
                   "pip install wandb (or pip install 'beitv2[wandb]')"]
    assert not out.exists()
