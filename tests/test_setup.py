"""The README's two commands do their own set-up: the Makefile's Fashion-MNIST step and CI's exit-code rule.

The machine's real package is never touched: the data path, the package manager and the root check are Makefile
variables, pointed here at a temporary folder and a stand-in `apt-get` script that records its arguments.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _make(*args: str) -> subprocess.CompletedProcess:
    # Under `make test ALLOW_NO_TESTS=1` (CI) the outer make's command-line variables reach a child make through
    # MAKEFLAGS and the environment; each call here must see only its own arguments.
    drop = ("MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL", "ALLOW_NO_TESTS", "PYTEST_ARGS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _fake_apt(tmp_path: Path, creates: Path | None) -> tuple[Path, Path]:
    log = tmp_path / "apt.log"
    script = tmp_path / "apt-get"
    make_dir = f'mkdir -p "{creates}"' if creates else "true"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\ncase "$1" in install) {make_dir};; esac\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def test_data_present_does_nothing(tmp_path):
    script, log = _fake_apt(tmp_path, None)
    r = _make("data", f"FMNIST_DIR={tmp_path}", f"APT_GET={script}", "IS_ROOT=yes")
    assert r.returncode == 0, r.stderr
    assert not log.exists()


def test_data_missing_installs_package_when_root(tmp_path):
    target = tmp_path / "fashion-mnist"
    script, log = _fake_apt(tmp_path, target)
    r = _make("data", f"FMNIST_DIR={target}", f"APT_GET={script}", "IS_ROOT=yes")
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["update -qq", "install -y -qq dataset-fashion-mnist"]
    assert target.is_dir()


def test_data_missing_without_root_names_the_command(tmp_path):
    script, log = _fake_apt(tmp_path, tmp_path / "x")
    r = _make("data", f"FMNIST_DIR={tmp_path / 'missing'}", f"APT_GET={script}", "IS_ROOT=")
    assert r.returncode != 0
    assert f"{script} update -qq && {script} install -y -qq dataset-fashion-mnist" in r.stderr
    assert not log.exists()


def test_data_install_that_leaves_no_folder_fails(tmp_path):
    script, _ = _fake_apt(tmp_path, None)
    r = _make("data", f"FMNIST_DIR={tmp_path / 'missing'}", f"APT_GET={script}", "IS_ROOT=yes")
    assert r.returncode != 0 and "is missing" in r.stderr


def test_make_test_maps_no_tests_collected_only_when_allowed(tmp_path):
    venv = Path(sys.executable).parents[1]  # the running interpreter's environment stands in for .venv
    common = ["test", "-o", "venv", f"VENV={venv}", f"FMNIST_DIR={tmp_path}",
              "PYTEST_ARGS=tests/test_readme.py -k no_such_test -p no:cacheprovider"]
    assert _make(*common, "ALLOW_NO_TESTS=1").returncode == 0
    assert _make(*common).returncode != 0


def test_ci_run_only_calls_make_test():
    text = (ROOT / ".ci/run").read_text()
    commands = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-1].strip() == "exec make test ALLOW_NO_TESTS=1"
    assert "apt-get" not in "\n".join(commands)
    assert os.access(ROOT / ".ci/run", os.X_OK)
