"""Ordinary user mistakes end with one line on stderr and exit status 2, before any work; own RGB data needs one
option; a rerun into an earlier run's folder continues it only with that run's settings. Each case runs the real
`beitv2` program in a subprocess under a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from beitv2.checkpoint import read_metadata, save_model
from beitv2.cli import main
from beitv2.models.architectures import build_model
from beitv2.utils.imaging import LUMA

PY = [sys.executable, "-m", "beitv2"]
QUIET = ["--data.num_workers", "0", "--train.precision", "fp32", "--no-train.tensorboard"]


def beitv2(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    t = time.perf_counter()
    r = subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, "BEITV2_TRACEBACK": "", **(env or {})})
    r.elapsed = time.perf_counter() - t
    return r


def one_line_error(r, *expected: str) -> str:
    """The run failed as a user mistake: status 2, one stderr line, no traceback, naming every ``expected``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> Path:
    """A folder of 16 RGB images in two classes (32 px, colourful: their gray version differs)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def tokenizer_args(rgb: Path, out: Path, *extra: str) -> list[str]:
    """The grayscale Fashion-MNIST preset on own RGB images: --data.channels 3 is the only channel option."""
    return ["train-tokenizer", "--preset", "vqkd_tiny_fmnist", "--data.kind", "folder", "--data.path", str(rgb),
            "--data.channels", "3", "--data.val_fraction", "0.25", "--train.batch_size", "4", "--train.epochs", "1",
            "--train.output_dir", str(out), *QUIET, *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, rgb):
    """A finished one-epoch VQ-KD run on the RGB folder (stderr kept for the warnings it must show)."""
    out = tmp_path_factory.mktemp("runs") / "tok"
    r = beitv2(*tokenizer_args(rgb, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


# ------------------------------------------------------------------------------------------ own data, one option

def test_rgb_data_needs_only_data_channels(run_dir):
    out, _ = run_dir
    meta = read_metadata(out / "model.safetensors")
    assert json.loads(meta["config"])["encoder"]["in_chans"] == 3  # the preset's 1 followed --data.channels 3


def test_pretrain_channels_follow_data_and_tokenizer_mismatch_names_the_option(run_dir, rgb, capsys):
    out, _ = run_dir
    base = ["pretrain", "--preset", "beitv2_tiny_fmnist", "--tokenizer.checkpoint", str(out / "model.safetensors"),
            "--data.kind", "folder", "--data.path", str(rgb)]
    capsys.readouterr()
    assert main([*base, "--data.channels", "3", "--print-config"]) == 0
    printed = capsys.readouterr()
    assert yaml.safe_load(printed.out)["model"]["backbone"]["in_chans"] == 3
    assert "not ready" not in printed.out and not printed.err
    # without it the preset's grayscale input meets the RGB tokenizer: the message says what to pass
    one_line_error(beitv2(*base, "--train.output_dir", str(out.parent / "pt")), "tokenizer.checkpoint",
                   "--data.channels 3")
    assert not (out.parent / "pt").exists()


def test_channels_set_twice_differently_name_both(tmp_path):
    r = beitv2("train-tokenizer", "--preset", "vqkd_tiny_fmnist", "--data.channels", "3",
               "--tokenizer.vqkd.encoder.in_chans", "1", "--train.output_dir", str(tmp_path / "o"))
    one_line_error(r, "data.channels", "tokenizer.vqkd.encoder.in_chans")


def test_rgb_input_to_a_grayscale_teacher_is_its_luma(tmp_path):
    """A 1-channel beitv2 teacher fed an RGB tokenizer view sees PIL's 'L' conversion of it, not an error."""
    from beitv2.teachers import TeacherConfig, build_teacher

    model = build_model("vit_tiny", in_chans=1)  # 28 px, patch 4: a 7 x 7 grid
    save_model(tmp_path / "gray.safetensors", model)
    teacher = build_teacher(TeacherConfig(kind="beitv2", name_or_path=str(tmp_path / "gray.safetensors"),
                                          bf16=False), 7)
    rgb = torch.rand(2, 3, 28, 28)
    luma = sum(w * rgb[:, c] for c, w in enumerate(LUMA))[:, None]  # PIL's weights
    torch.testing.assert_close(teacher(rgb), teacher(luma))
    assert not torch.allclose(teacher(rgb), teacher(rgb.mean(1, keepdim=True)), atol=1e-3)


# ------------------------------------------------------------------------------------- warnings of the run itself

def test_random_teacher_warned_once_and_validation_shows_a_bar(run_dir):
    _, stderr = run_dir
    warned = [line for line in stderr.splitlines() if "random weights" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "teacher.random_init" in warned[0]
    assert "validation" in stderr  # the bar of the validation pass (4 held-out images)


# ---------------------------------------------------------------------------------- reruns into a run's folder

def test_rerun_with_another_architecture_stops_before_work(run_dir, rgb):
    out, _ = run_dir
    before = sorted(p.name for p in out.iterdir())
    r = beitv2(*tokenizer_args(rgb, out, "--tokenizer.vqkd.quantizer.num_codes", "256"))
    line = one_line_error(r, "tokenizer.vqkd.quantizer.num_codes: 512 in the run, 256 now", str(out),
                          "--train.output_dir")
    assert "--train.resume" not in line  # its weights could not be loaded: no deliberate resume offered
    assert sorted(p.name for p in out.iterdir()) == before


def test_rerun_with_another_lr_offers_a_deliberate_resume(run_dir, rgb):
    out, _ = run_dir
    r = beitv2(*tokenizer_args(rgb, out, "--optim.lr", "0.01"))
    one_line_error(r, "optim.lr: 0.001 in the run, 0.01 now", f"--train.resume {out}/ckpt-")


def test_explicit_resume_of_another_architecture_exits_2(run_dir, rgb):
    out, _ = run_dir
    ckpt = (out / "latest").read_text().strip()
    r = beitv2(*tokenizer_args(rgb, out, "--train.resume", str(out / ckpt), "--tokenizer.vqkd.quantizer.code_dim",
                               "16"))
    one_line_error(r, "train.resume", "tokenizer.vqkd.quantizer.code_dim: 32 in the run, 16 now")


def test_rerun_may_extend_epochs_and_resume_deliberately_with_new_lr(run_dir, rgb, tmp_path):
    """train.epochs may change on a rerun (a warning says so); other settings only through --train.resume."""
    out = tmp_path / "tok"
    shutil.copytree(run_dir[0], out)  # this test continues the run: the shared one stays as the other tests expect
    steps = int((out / "latest").read_text().strip().split("-")[1])
    r = beitv2(*tokenizer_args(rgb, out, "--train.epochs", "2", "--no-train.progress"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.epochs 2 (started with 1)" in r.stderr and "Traceback" not in r.stderr
    assert (out / "latest").read_text().strip() == f"ckpt-{2 * steps}"  # continued, not restarted
    ckpt = out / f"ckpt-{2 * steps}"
    r = beitv2(*tokenizer_args(rgb, out, "--train.epochs", "3", "--optim.lr", "0.002", "--train.resume", str(ckpt),
                               "--no-train.progress"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optim.lr: 0.001 in the run, 0.002 now" in r.stderr
    assert (out / "latest").read_text().strip() == f"ckpt-{3 * steps}"


# ---------------------------------------------------------------------------------------- checked before any work

@pytest.mark.parametrize("command, extra", [
    ("train-tokenizer", ["--preset", "vqkd_tiny_fmnist"]),
    ("pretrain", ["--model.target", "pixels"]),
    ("knn", ["--model.random_init", "--model.preset", "vit_tiny"]),
])
def test_empty_image_folder_names_path_and_option(tmp_path, command, extra):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    r = beitv2(command, *extra, "--data.kind", "folder", "--data.path", str(tmp_path / "empty"),
               "--train.output_dir" if command != "knn" else "--run.output_dir", str(tmp_path / "o"))
    one_line_error(r, "data.path", str(tmp_path / "empty"), "no images")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["under_file", "read_only"])
def test_unwritable_output_folder_fails_before_training(tmp_path, where):
    if where == "under_file":
        (tmp_path / "f").write_text("a regular file")
        out, expected = tmp_path / "f" / "run", "a file"
    else:  # sysfs refuses new entries even to root, unlike a chmod'ed folder
        out, expected = Path("/sys/beitv2-test-out"), "cannot write in /sys"
    r = beitv2("pretrain", "--model.target", "pixels", "--data.kind", "fmnist", "--train.output_dir", str(out))
    one_line_error(r, "train.output_dir", expected)
    r = beitv2("knn", "--model.random_init", "--model.preset", "vit_tiny", "--data.kind", "fmnist",
               "--run.output_dir", str(out))
    one_line_error(r, "run.output_dir", expected)


def test_tokenize_and_convert_check_their_output_before_work(tmp_path, run_dir, rgb):
    (tmp_path / "f").write_text("a regular file")
    tok, _ = run_dir
    r = beitv2("tokenize", "--tokenizer.checkpoint", str(tok), "--data.kind", "folder", "--data.path", str(rgb),
               "--data.channels", "3", "--out.path", str(tmp_path / "f" / "codes.safetensors"))
    one_line_error(r, "out.path", "a file")
    model = tmp_path / "vit.safetensors"
    save_model(model, build_model("vit_tiny"))
    for dest, out in (("hf", tmp_path / "f" / "hf"), ("timm", tmp_path / "f" / "timm"),
                      ("beitv2", tmp_path / "f" / "m.safetensors")):
        one_line_error(beitv2("convert", "--from", "beitv2", "--to", dest, str(model), str(out)), "output", "a file")


def test_unknown_option_and_command_suggest_the_nearest():
    one_line_error(beitv2("pretrain", "--optim.lrr", "1"), "--optim.lrr", "did you mean --optim.lr?")
    one_line_error(beitv2("pretrian"), "'pretrian'", "did you mean pretrain?")


# --------------------------------------------------------------------------------------------- the model hub

@pytest.fixture(scope="module")
def startup(tmp_path_factory) -> float:
    """Seconds a training command takes to start and resolve its configuration, on this machine now."""
    r = beitv2("train-tokenizer", "--data.kind", "fmnist", "--print-config")
    assert r.returncode == 0
    return r.elapsed


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("teacher", [[], ["--teacher.kind", "timm", "--teacher.name_or_path", "vit_small_patch16_224"]],
                         ids=["hf", "timm"])
def test_teacher_without_hub_fails_fast_in_one_line(tmp_path, startup, env, teacher):
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HOME": str(tmp_path / "hf")}
    r = beitv2("train-tokenizer", "--data.kind", "fmnist", *teacher, "--train.output_dir", str(tmp_path / "o"),
               env=env)
    one_line_error(r, "teacher.name_or_path", "HF_HUB_OFFLINE=1", "local directory")
    # beyond start-up (and importing the teacher's library) no time goes to requests the hub cannot answer
    assert r.elapsed - startup < 10, (r.elapsed, startup)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- --print-config

def test_print_config_prints_and_lists_what_is_missing(tmp_path, capsys):
    capsys.readouterr()
    assert main(["pretrain", "--data.path", str(tmp_path / "nowhere"), "--print-config"]) == 0
    printed = capsys.readouterr()
    cfg = yaml.safe_load(printed.out)  # still valid YAML: the problems are comments
    assert cfg["data"]["path"] == str(tmp_path / "nowhere")
    problems = printed.out.split("# not ready to run yet:")[1]
    assert "data.path" in problems and "tokenizer.checkpoint" in problems
    assert len(printed.err.strip().splitlines()) == 1 and "2 value(s)" in printed.err
