"""Multi-process behaviour with real gloo process groups on CPU: 2-3 `beitv2` processes started the way plain SLURM
``srun`` starts them (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no torchrun), each under a timeout so that a
deadlock fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from beitv2.checkpoint import load_state_dict
from beitv2.engine import distributed as D
from beitv2.engine import state as S
from beitv2.engine.precision import choose_precision

# A deadlock is caught by the per-launch limit (LIMIT s, then every rank is killed and its log shown) or, failing
# that, by pytest-timeout. The limits are generous because the shared 2-core CI machine can be very slow; an
# unloaded run of each multi-process test takes seconds.
LIMIT = 300
pytestmark = pytest.mark.timeout(3 * LIMIT)

TEACHER = {"kind": "timm", "name_or_path": "vit_tiny_patch16_224", "random_init": True,
           "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}
VQKD = {"encoder": {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "decoder_depth": 1, "quantizer": {"num_codes": 16, "code_dim": 8}, "teacher_dim": 32}
TRAIN = {"batch_size": 2, "log_every_steps": 1, "progress": False, "tensorboard": False, "device": "cpu"}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_folder(root: Path, n_per_class: int, size: int = 20, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(len(str(root)))
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    for i in range(corrupt):
        (root / "class0" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root


def tokenizer_yaml(tmp: Path, out: Path, data: dict, **train) -> Path:
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "tokenizer": {"type": "vqkd", "vqkd": VQKD}, "teacher": TEACHER, "data": {"num_workers": 0, **data},
        "optim": {"lr": 1e-3, "warmup_epochs": 0.5}, "train": {**TRAIN, "output_dir": str(out), **train}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun(argv: list[str], n: int, log_dir: Path) -> list[subprocess.Popen]:
    """``n`` ranks of ``beitv2 argv`` with the environment srun gives its tasks (one node, no torchrun)."""
    port = str(free_port())
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(n):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(r), SLURM_NTASKS=str(n), SLURM_LOCALID=str(r), SLURM_NODELIST="localhost",
                   SLURM_JOB_ID="4242", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=SRC)
        with open(log_dir / f"rank{r}.log", "w") as f:  # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, "-m", "beitv2.cli", *argv], env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float, log_dir: Path) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        pytest.fail(f"ranks still running after {timeout} s (deadlock?):\n{logs(log_dir)}")


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(log_dir.glob("rank*.log")))


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# ------------------------------------------------------------------------------------------- pure functions

def test_launch_env_reads_torchrun_then_slurm():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[07-08,11]",
             "SLURM_JOB_ID": "123456"}
    le = D.launch_env(slurm)
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (5, 8, 1, "slurm")
    assert le.master_addr == "gpu07" and le.master_port == str(20000 + 123456 % 20000)
    assert D.launch_env({**slurm, "SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "head"}).world_size == 4
    assert D.launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_addr == "head"
    tr = D.launch_env({**slurm, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"})  # torchrun inside srun
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher) == (2, 4, 2, "torchrun")
    assert D.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    assert D.first_host("node1,node2") == "node1" and D.first_host("a-b[3-4]") == "a-b3"


def test_device_follows_local_rank_under_several_processes():
    assert D.select_device("cuda:0", 3, 8, True, 8) == ("cuda:3", D.select_device("cuda:0", 3, 8, True, 8)[1])
    assert "ignored" in D.select_device("cuda:0", 3, 8, True, 8)[1]
    assert D.select_device("cuda:3", 3, 8, True, 8) == ("cuda:3", None)
    assert D.select_device("cuda:5", 0, 1, True, 8) == ("cuda:5", None)  # one process: as asked
    assert D.select_device("auto", 2, 4, True, 4) == ("cuda:2", None)
    assert D.select_device("cuda", 3, 4, True, 1) == ("cuda:0", None)  # srun --gpus-per-task=1: one visible GPU
    assert D.select_device("auto", 2, 4, False, 0) == ("cpu", None)


def test_cpu_checkpoint_resumed_on_gpu_seeds_each_rank():
    cpu_written = S.rng_state()
    cpu_written.pop("cuda", None)
    seeds = [D.cuda_seed_for_resume(cpu_written, "cuda", 7, r, 100) for r in range(4)]
    assert None not in seeds and len(set(seeds)) == 4
    assert D.cuda_seed_for_resume({**cpu_written, "cuda": torch.zeros(1)}, "cuda", 7, 0, 100) is None  # restored
    assert D.cuda_seed_for_resume(cpu_written, "cpu", 7, 0, 100) is None


def test_bf16_only_where_native():
    assert choose_precision("bf16", "cuda", bf16_native=False) == "fp16"  # pre-Ampere: emulated bf16
    assert choose_precision("bf16", "cuda", bf16_native=True) == "bf16"
    assert choose_precision("bf16", "cpu", bf16_native=False) == "fp32"  # AVX2-only x86: bf16 is a scalar fallback
    assert choose_precision("bf16", "cpu", bf16_native=True) == "bf16"  # AVX512-BF16 / AMX
    assert choose_precision("fp32", "cuda", bf16_native=False) == "fp32"
    assert choose_precision("fp16", "cpu", bf16_native=False) == "fp16"  # asked for explicitly: kept


def test_cpu_bf16_probe_matches_the_cpu_flags():
    """The probe reads what the kernel reports: on x86 it says native exactly when /proc/cpuinfo lists avx512_bf16 or
    amx_bf16 (an independent reading of the same hardware)."""
    import platform

    from beitv2.engine.precision import cpu_bf16_native

    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.is_file():
        assert cpu_bf16_native() is True
        return
    flags = set(info.read_text().split())
    assert cpu_bf16_native() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_mixup_gets_an_even_batch():
    from timm.data import Mixup

    from beitv2.eval.finetune import even_batch

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3)
    for b in (1, 3, 4):
        x, y = even_batch(torch.rand(b, 3, 8, 8), torch.arange(b) % 3)
        assert x.shape[0] == y.shape[0] == (2 if b == 1 else b - b % 2)
        mx, target = mix(x, y)  # timm asserts an even batch
        assert target.shape == (x.shape[0], 3)
    # the fine-tuning task itself, on a batch of 3 (one of 4 images was unreadable)
    from timm.loss import SoftTargetCrossEntropy

    from beitv2.eval.finetune import ClassificationTask

    task = ClassificationTask(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)),
                              SoftTargetCrossEntropy(), mix)
    loss, _ = task({"image": torch.rand(3, 3, 8, 8), "label": torch.tensor([0, 1, 2])})
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ several processes

def corrupt(folder: Path, indices) -> None:
    """Overwrite the images at these data-set indices (the folder's sorted order) with bytes no decoder reads."""
    from beitv2.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(kind="folder", path=str(folder)), "train")
    for i in indices:
        Path(ds.path(i)).write_bytes(b"not an image")


def test_validation_with_uneven_batches_over_three_ranks(tmp_path):
    """10 validation images over 3 ranks (every 3rd image) in batches of 3: ranks see 2, 1 and 1 batches, and rank
    1's only batch is all unreadable. Every readable image is counted once (no sampler padding) and no rank waits
    for a per-batch collective another rank never reaches."""
    train = make_folder(tmp_path / "train", 3)
    val = make_folder(tmp_path / "val", 5)
    corrupt(val, [1, 4, 7])  # rank 1's images
    out = tmp_path / "run"
    cfg = tokenizer_yaml(tmp_path, out, {"kind": "folder", "path": str(train), "val_path": str(val)}, epochs=1)
    codes = wait_all(srun(["train-tokenizer", "--config", str(cfg)], 3, tmp_path / "logs"), LIMIT, tmp_path / "logs")
    assert codes == [0, 0, 0], logs(tmp_path / "logs")
    (rec,) = records(out, "val")
    assert rec["images"] == 7 and np.isfinite(rec["loss"]) and rec["codebook_codes_used"] >= 1
    (sync,) = records(out, "rank_sync")
    assert sync["in_sync"] and len(sync["digests"]) == 3


def test_sigterm_to_all_ranks_saves_one_checkpoint_and_resumes_bitwise(tmp_path):
    """SIGTERM to every process of a 2-rank run with 2 data-loader workers each (what a scheduler does): both ranks
    stop at the same step boundary, write one checkpoint and exit 143; the rerun ends with the weights of an
    uninterrupted run."""
    data = make_folder(tmp_path / "train", 12, size=64)  # 24 images: 6 steps per epoch of 2 x 2
    full, cut = tmp_path / "full", tmp_path / "cut"
    kw = {"kind": "folder", "path": str(data), "num_workers": 2}
    cfg_full = tokenizer_yaml(tmp_path, full, kw, epochs=2)
    cfg_cut = tokenizer_yaml(tmp_path, cut, kw, epochs=2)
    procs = srun(["train-tokenizer", "--config", str(cfg_cut)], 2, tmp_path / "logs_cut")
    ref = srun(["train-tokenizer", "--config", str(cfg_full)], 2, tmp_path / "logs_full")  # meanwhile, the reference
    deadline = time.monotonic() + LIMIT
    # a step line (read as text: rank 0 may be half-way through writing the next line)
    while not ((cut / "metrics.jsonl").is_file() and '"type": "step"' in (cut / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(tmp_path / "logs_cut")
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)  # the rank and its loader workers
    codes = wait_all(procs, LIMIT, tmp_path / "logs_cut")
    assert codes == [128 + signal.SIGTERM] * 2, logs(tmp_path / "logs_cut")
    ckpts = S.list_checkpoints(cut)
    assert len(ckpts) == 1 and 1 <= ckpts[0][0] < 12, ckpts
    st = S.load_train_state(ckpts[0][1])
    assert st["world_size"] == 2 and len(st["rng"]) == 2
    assert not (cut / "model.safetensors").exists()
    # the rerun resumes from that checkpoint; the uninterrupted run is the reference
    codes = wait_all(srun(["train-tokenizer", "--config", str(cfg_cut)], 2, tmp_path / "logs_re"), LIMIT,
                     tmp_path / "logs_re")
    assert codes == [0, 0], logs(tmp_path / "logs_re")
    assert wait_all(ref, LIMIT, tmp_path / "logs_full") == [0, 0], logs(tmp_path / "logs_full")
    assert [r["step"] for r in records(cut, "step")] == list(range(1, 13))
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_rank_ends_the_job_with_one_line(tmp_path):
    """Rank 1's first batch is all unreadable: it raises while rank 0 waits in the step's gradient all-reduce.
    Both processes end promptly and rank 1's log ends with its error on one line, without a traceback."""
    from beitv2.engine.sampler import ResumableSampler

    data = make_folder(tmp_path / "train", 4)
    corrupt(data, list(ResumableSampler(range(8), num_replicas=2, rank=1, shuffle=True, seed=0))[:2])
    out = tmp_path / "run"
    cfg = tokenizer_yaml(tmp_path, out, {"kind": "folder", "path": str(data)}, epochs=1, dist_timeout_min=10)
    t0 = time.monotonic()
    codes = wait_all(srun(["train-tokenizer", "--config", str(cfg)], 2, tmp_path / "logs"), LIMIT, tmp_path / "logs")
    assert codes[1] == 1 and codes[0] != 0, logs(tmp_path / "logs")
    rank1 = (tmp_path / "logs" / "rank1.log").read_text()
    last = rank1.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("[rank 1] failed: RuntimeError: every image of batch") and "was unreadable" in last
    assert last.endswith("; aborting the job") and "Traceback" not in rank1
    assert time.monotonic() - t0 < LIMIT


# ------------------------------------------------------------------------------------------------ memory bounds

def test_knn_in_blocks_equals_one_block():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    from beitv2.eval.knn import knn_scores

    whole = knn_scores(train, labels, val, 3, ks=(1, 5, 20), chunk_size=1000, train_chunk=1000)
    blocks = knn_scores(train, labels, val, 3, ks=(1, 5, 20), chunk_size=2, train_chunk=3)
    for k in whole:
        torch.testing.assert_close(blocks[k], whole[k])


def test_kmeans_in_row_blocks_equals_one_block():
    from beitv2.models.quantizer import kmeans_cosine

    x = torch.nn.functional.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    m1, b1 = kmeans_cosine(x, 16, 5, torch.Generator().manual_seed(0))
    m2, b2 = kmeans_cosine(x, 16, 5, torch.Generator().manual_seed(0), chunk_bytes=4 * 16 * 7)  # 7 rows a block
    assert torch.equal(b1, b2) and torch.allclose(m1, m2, atol=1e-6)


def test_two_rank_features_are_gathered_as_tensors(tmp_path):
    """`beitv2 knn` on 2 ranks: every image's feature arrives once, equal to the single-process features (gathered in
    chunks of tensors by `gather_rows`, rank 0's part first), and the k-NN result is the same."""
    from beitv2.checkpoint import save_model
    from beitv2.cli import main
    from beitv2.models.backbone import BEiTViT, ViTConfig

    cfg = ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=1, num_heads=2)
    ckpt = save_model(tmp_path / "vit.safetensors", BEiTViT(cfg), "vit", cfg)
    train, val = make_folder(tmp_path / "train", 5), make_folder(tmp_path / "val", 2)  # 10 and 4 images
    argv = ["knn", "--model.checkpoint", str(ckpt), "--data.path", str(train), "--data.val_path", str(val),
            "--knn.k", "1 3", "--data.num_workers", "0", "--run.precision", "fp32", "--run.progress", "false",
            "--run.device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    procs = srun([*argv, "--run.output_dir", str(two), "--features.cache_dir", str(two)], 2, tmp_path / "logs")
    assert main([*argv, "--run.output_dir", str(one), "--features.cache_dir", str(one)]) == 0
    assert wait_all(procs, LIMIT, tmp_path / "logs") == [0, 0], logs(tmp_path / "logs")
    from safetensors.torch import load_file

    for split, n in (("train", 10), ("val", 4)):
        (a,) = one.glob(f"features-{split}-*.safetensors")
        (b,) = two.glob(f"features-{split}-*.safetensors")
        a, b = load_file(str(a)), load_file(str(b))
        order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])  # rank 0's images, then rank 1's
        assert torch.equal(b["labels"], a["labels"][order])
        torch.testing.assert_close(b["layer_1"], a["layer_1"][order], atol=1e-5, rtol=1e-5)
    ma, mb = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert ma["num_train"] == mb["num_train"] == 10 and ma["acc1"] == mb["acc1"]


def test_sigterm_to_one_rank_stops_both_at_the_same_check_point_and_resumes_bitwise(tmp_path):
    """SIGTERM to rank 1 alone (its loader workers too), the ranks agreeing on a stop only every 4 steps (and at
    epoch ends; logging only at step 1): nothing is read back per step, yet both ranks leave at the same check
    point, write one checkpoint together with identical weights, and exit 143; the rerun ends with the weights of an
    uninterrupted run."""
    data = make_folder(tmp_path / "train", 12, size=64)  # 24 images: 6 steps per epoch of 2 x 2
    full, cut = tmp_path / "full", tmp_path / "cut"
    kw = {"kind": "folder", "path": str(data), "num_workers": 2}
    every = {"epochs": 3, "log_every_steps": 100, "stop_check_every_steps": 4}
    cfg_full = tokenizer_yaml(tmp_path, full, kw, **every)
    cfg_cut = tokenizer_yaml(tmp_path, cut, kw, **every)
    procs = srun(["train-tokenizer", "--config", str(cfg_cut)], 2, tmp_path / "logs_cut")
    ref = srun(["train-tokenizer", "--config", str(cfg_full)], 2, tmp_path / "logs_full")
    deadline = time.monotonic() + LIMIT
    while not ((cut / "metrics.jsonl").is_file() and '"type": "step"' in (cut / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(tmp_path / "logs_cut")
        time.sleep(0.02)
    os.killpg(procs[1].pid, signal.SIGTERM)  # rank 1 only
    codes = wait_all(procs, LIMIT, tmp_path / "logs_cut")
    assert codes == [128 + signal.SIGTERM] * 2, logs(tmp_path / "logs_cut")
    ckpts = S.list_checkpoints(cut)
    stopped = ckpts[-1][0]
    assert stopped in (4, 6, 8, 12, 16), ckpts  # a check point after step 1: every 4th step or an epoch end
    assert [s for s, _ in ckpts] == [s for s in (6, 12) if s < stopped] + [stopped]  # epoch ends, then the stop
    st = S.load_train_state(ckpts[-1][1])
    assert st["global_step"] == stopped and st["world_size"] == 2 and len(st["rng"]) == 2
    (sync,) = records(cut, "rank_sync")
    assert sync["in_sync"] and sync["step"] == stopped  # rank 1 stopped at rank 0's step, with the same weights
    assert not (cut / "model.safetensors").exists()
    codes = wait_all(srun(["train-tokenizer", "--config", str(cfg_cut)], 2, tmp_path / "logs_re"), LIMIT,
                     tmp_path / "logs_re")
    assert codes == [0, 0], logs(tmp_path / "logs_re")
    assert wait_all(ref, LIMIT, tmp_path / "logs_full") == [0, 0], logs(tmp_path / "logs_full")
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
