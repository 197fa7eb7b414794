"""The README's "Command line" and "Python API" blocks run as written, in order, in one temporary folder.

Each command line is run exactly as the README spells it (paths included); the test only appends overrides that
shrink the budget (a data subset, one epoch, no progress bars). A path or option that went stale in the README makes
its line fail. Lines that need files no test can fetch get a stand-in written at the exact path named, listed in
`STAND_INS`; the quickstart lines are checked as a dry run (`--print-config`: every option parsed and the plan
resolved, nothing trained), since even `--plan fast` takes minutes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import write_fmnist

from beitv2.cli import main

README = Path(__file__).parents[1] / "README.md"

DATA = ["--data.subset", "64", "--data.val_subset", "32", "--data.num_workers", "0"]
TRAIN = ["--train.epochs", "1", "--train.batch_size", "32", "--no-train.progress", "--no-train.tensorboard"]
BUDGET = {
    "train-tokenizer": DATA + TRAIN,
    "pretrain": DATA + TRAIN,
    "linprobe": DATA + TRAIN,
    "finetune": DATA + TRAIN,
    "knn": DATA + ["--no-run.progress"],
    "tokenize": ["--data.subset", "64", "--data.num_workers", "0", "--no-out.progress"],
    "atlas": ["--data.val_subset", "64", "--data.num_workers", "0", "--atlas.top_k", "4", "--no-atlas.progress"],
    "quickstart": ["--print-config"],  # a dry run: the options parse and the plan resolves; the run takes minutes
}
DATA_COMMANDS = ("train-tokenizer", "pretrain", "linprobe", "finetune", "knn", "tokenize", "atlas")
# the official release's .pth cannot be downloaded here: a tiny model with the official key names stands in at the
# README's path; its head count is not in the weights, so it is given
STAND_INS = {"beitv2_base_patch16_224_pt1k.pth": ["--model.num_heads", "4"]}


def readme_block(heading: str, lang: str) -> str:
    text = README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def command_lines() -> list[list[str]]:
    lines = [shlex.split(line, comments=True) for line in readme_block("Command line", "bash").splitlines()]
    return [t for t in lines if t]


def write_official_stand_in(path: Path) -> None:
    import beitv2

    torch.manual_seed(0)
    torch.save({"model": beitv2.create_model("beitv2_tiny").state_dict()}, path)


def run_cli(argv: list[str]) -> int:
    try:
        return int(main(argv))
    except SystemExit as e:  # argparse: --help exits 0, an unknown option 2
        return int(e.code or 0)


def test_readme_command_line_runs_as_written(tmp_path, monkeypatch, capsys):
    from beitv2.data import FASHION_MNIST_ROOT
    from beitv2.data.fmnist import find_idx

    lines = command_lines()
    assert len(lines) >= 10 and all(t[0] == "beitv2" for t in lines)
    monkeypatch.chdir(tmp_path)
    extra_data: list[str] = []
    if not find_idx(FASHION_MNIST_ROOT, "train-images-idx3-ubyte"):  # the Debian package is absent: small IDX files
        extra_data = ["--data.path", str(write_fmnist(tmp_path / "fmnist_idx", 200, 100))]
    ran = []
    for tokens in lines:
        command = tokens[1] if len(tokens) > 1 and not tokens[1].startswith("-") else ""
        argv = tokens[1:] + BUDGET.get(command, []) + (extra_data if command in DATA_COMMANDS else [])
        for name, options in STAND_INS.items():
            if name in tokens:
                write_official_stand_in(tmp_path / name)
                argv += options
        rc = run_cli(argv)
        out = capsys.readouterr()
        assert rc == 0, f"README line `{shlex.join(tokens)}` exited {rc}: {out.err.strip()[-800:]}"
        ran.append(command)
    assert {"train-tokenizer", "pretrain", "linprobe", "knn", "finetune", "convert", "tokenize", "atlas",
            "report", "quickstart"} <= set(ran)
    # what the chain should have produced, at the paths the README names
    for path in ("runs/vqkd_tiny_fmnist/model.safetensors", "runs/beitv2_tiny_fmnist/model.safetensors",
                 "runs/finetune/model.safetensors", "out/hf_beit/config.json", "hub_folder/model.safetensors",
                 "codes.safetensors.json", "atlas.png", "runs/vqkd_tiny_fmnist/training_curves.png"):
        assert (tmp_path / path).is_file(), path
    check_tokenize_ids(tmp_path / "codes.safetensors", extra_data)
    # the Python API block names a file the command line wrote: it must exist and load
    code = readme_block("Python API", "python")
    named = re.findall(r'"(runs/[^"]+)"', code)
    assert named, "the Python API block names no run file"
    import beitv2

    for rel in named:
        assert beitv2.load_model(tmp_path / rel).kind == "mim", rel


def check_tokenize_ids(path: Path, extra_data: list[str]) -> None:
    """`tokenize --data.subset` stores each image's index in the IDX file, and its codes are that image's."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from beitv2.data import EvalTransform, FashionMNIST
    from beitv2.models.architectures import build_model  # noqa: F401 - registers the kinds load_model reads

    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        ids = json.loads(f.metadata()["ids"])
    assert len(ids) == 64 == len(t["codes"])
    full = FashionMNIST(extra_data[1] if extra_data else None, train=True, channels=1)
    assert ids != list(range(64)) and max(ids) < len(full)
    assert t["labels"].tolist() == [int(full.labels[i]) for i in ids]
    import beitv2

    tok = beitv2.load_model(path.parent / "runs/vqkd_tiny_fmnist/model.safetensors")
    tf = EvalTransform((28, 28), 28, "bicubic", normalize="none", channels=1, output="float")
    picked = [0, 31, 63]
    with torch.no_grad():
        codes = tok.tokenize(torch.stack([tf(full[ids[i]][0]) for i in picked]))
    assert torch.equal(t["codes"][picked].reshape(3, -1).long(), codes)


def test_readme_python_example_runs():
    code = readme_block("Python API", "python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["codes"].shape == (8, 49)
    assert len(scope["logits"]) == 2 and scope["loss"].item() > 0


def test_version_answers_without_importing_torch():
    probe = ("import sys; from beitv2.cli import main; rc = main(['--version']); "
             "print(rc, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    import beitv2

    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [f"beitv2 {beitv2.__version__}", "0 False"]


def test_quickstart_takes_the_dotted_names_and_the_old_spellings(capsys):
    def plan(*argv: str) -> dict:
        assert run_cli(["quickstart", "--plan", "fast", "--print-config", *argv]) == 0
        import yaml

        return yaml.safe_load(capsys.readouterr().out)

    new = plan("--data.path", "/x", "--teacher.kind", "timm", "--teacher.name_or_path", "t", "--teacher.checkpoint",
               "w", "--teacher.stand_in", "vit", "--features.feature", "cls+mean")
    old = plan("--data-path", "/x", "--teacher-kind", "timm", "--teacher", "t", "--teacher-checkpoint", "w",
               "--stand-in", "vit", "--probe-feature", "cls+mean")
    assert new == old
    assert (new["data_path"], new["teacher_kind"], new["teacher"]) == ("/x", "timm", "t")
    assert new["teacher_checkpoint"] == "w"
    assert new["plan"]["teacher_arch"] == "vit" and new["plan"]["probe_feature"] == "cls+mean"


def test_linprobe_and_knn_read_a_segmenter_without_a_final_norm(tmp_path, capsys):
    from beitv2.checkpoint import save_model
    from beitv2.eval.backbones import ModelSource, load_backbone
    from beitv2.eval.features import layer_features
    from beitv2.models.backbone import ViTConfig
    from beitv2.models.segmenter import Segmenter, SegmenterConfig

    torch.manual_seed(0)
    vit = ViTConfig(img_size=(28,), patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2,
                    use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mean_pooling=True)
    seg = Segmenter(SegmenterConfig(backbone=vit, num_classes=5, auxiliary_channels=8)).eval()
    path = save_model(tmp_path / "seg.safetensors", seg, "segmenter")
    backbone, desc = load_backbone(ModelSource(checkpoint=str(path)))
    assert "no final norm" in desc
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        feats = layer_features(backbone, x, (4,), "mean", final_norm=True)[4]
        tokens = seg.backbone.forward_features(x)[0]  # the segmenter's own backbone's last block output
    assert torch.allclose(feats, tokens[:, 1:].mean(1), atol=1e-5)
    root = write_fmnist(tmp_path / "fmnist", 40, 20)
    assert run_cli(["knn", "--model.checkpoint", str(path), "--data.kind", "fmnist", "--data.path", str(root),
                    "--data.num_workers", "0", "--run.output_dir", str(tmp_path / "knn"), "--no-run.progress",
                    "--knn.k", "5"]) == 0
    assert "segmenter" in json.loads((tmp_path / "knn" / "metrics.json").read_text())["source"]


def test_linprobe_val_record_equals_metrics_json_under_bf16():
    """The epoch's validation pass scores the heads as `predict` does for metrics.json (fp32): under bf16 autocast
    some near-tied rows would otherwise flip."""
    from torch.utils.data import DataLoader

    from beitv2.eval.linprobe import FeatureDataset, LinearProbeTask, ProbeHeads, ProbeHeadsConfig, predict
    from beitv2.eval.metrics import accuracy

    g = torch.Generator().manual_seed(0)
    n, dim, classes = 16000, 64, 10
    feats = {4: torch.randn(n, dim, generator=g) * 3, 6: torch.randn(n, dim, generator=g) * 3}
    labels = torch.randint(0, classes, (n,), generator=g)
    heads = ProbeHeads(ProbeHeadsConfig((4, 6), (dim, dim), classes, False), init_std=1.0).eval()
    task = LinearProbeTask(heads)
    loader = DataLoader(FeatureDataset(feats, labels), batch_size=512)
    val = task.evaluate(loader, torch.device("cpu"), lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    logits = predict(heads, feats)
    for x in (4, 6):
        assert val[f"acc1_l{x}"] == pytest.approx(accuracy(logits[x], labels)["acc1"], abs=1e-9), x
