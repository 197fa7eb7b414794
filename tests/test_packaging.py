"""`pip install .` gives a working package: the wheel ships the presets and py.typed, and runs outside the repo."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from _helpers import write_fmnist

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None, timeout=300):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_wheel_installs_and_runs_a_preset_outside_the_repo(tmp_path):
    idx_tiny = write_fmnist(tmp_path / "fmnist")
    src = tmp_path / "src_copy"  # build from a copy so the worktree gets no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(src)], cwd=tmp_path)
    (wheel,) = wheels.glob("beitv2-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "beitv2/py.typed" in names and "beitv2/configs/vqkd_tiny_fmnist.yaml" in names
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import beitv2; print(beitv2.__file__)"], cwd=work, env=env).stdout
    assert where.strip().startswith(str(site))
    from beitv2 import __version__

    assert _run([sys.executable, "-m", "beitv2", "--version"], cwd=work, env=env).stdout.strip() == \
        f"beitv2 {__version__}"
    args = [sys.executable, "-m", "beitv2", "train-tokenizer", "--preset", "vqkd_tiny_fmnist", "--data.path",
            str(idx_tiny), "--data.num_workers", "0", "--train.epochs", "1", "--train.batch_size", "8",
            "--train.output_dir", "run", "--no-train.progress", "--no-train.tensorboard", "--train.precision", "fp32"]
    printed = _run([*args, "--print-config"], cwd=work, env=env).stdout
    assert "num_codes: 512" in printed  # the preset, read from the installed package
    _run(args, cwd=work, env=env)
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps and (work / "run" / "model.safetensors").is_file()
