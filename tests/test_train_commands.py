"""`beitv2 train-tokenizer` and `beitv2 pretrain` end to end on tiny real models and real files (CPU)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from idx_files import write_idx_split
from PIL import Image

from beitv2.checkpoint import load_model, load_state_dict
from beitv2.cli import main
from beitv2.engine import state as S

TEACHER = {"kind": "timm", "name_or_path": "vit_tiny_patch16_224", "random_init": True,
           "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}
VQKD = {"encoder": {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "decoder_depth": 1, "quantizer": {"num_codes": 64, "code_dim": 8}, "teacher_dim": 32}
MIM = {"backbone": {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                    "init_values": 0.1, "drop_path_rate": 0.1},
       "vocab_size": 64, "early_layers": 1, "head_layers": 1}
FAST = {"num_workers": 0}
TRAIN = {"epochs": 2, "batch_size": 8, "log_every_steps": 1, "progress": False, "tensorboard": False}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def make_folder(root: Path, n_per_class: int = 16, size: int = 20, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    for i in range(corrupt):
        (root / "class0" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def write_idx(root: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """Fashion-MNIST-format IDX files (gzipped): 28x28 uint8 images and labels 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx_split(root, prefix, imgs, labels)
    return root


def tokenizer_cfg(tmp: Path, data: dict, out: Path, **train) -> Path:
    return write_yaml(tmp / "tok.yaml", {"tokenizer": {"type": "vqkd", "vqkd": VQKD}, "teacher": TEACHER,
                                         "data": {**FAST, **data},
                                         "optim": {"lr": 1e-3, "lr_reference_batch": 0, "warmup_epochs": 0.5},
                                         "train": {**TRAIN, "output_dir": str(out), **train}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, folder) -> Path:
    """A VQ-KD trained for 2 epochs on the image folder, with a validation folder."""
    tmp = tmp_path_factory.mktemp("tok")
    val = make_folder(tmp / "val", n_per_class=4)
    out = tmp / "run"
    cfg = tokenizer_cfg(tmp, {"kind": "folder", "path": str(folder), "val_path": str(val)}, out)
    assert main(["train-tokenizer", "--config", str(cfg)]) == 0
    return out


# ---------------------------------------------------------------------------------------------- train-tokenizer

def test_train_tokenizer_folder_end_to_end(tokenizer):
    recs = metrics(tokenizer)
    steps = [r for r in recs if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 32 images / 8 = 4 steps x 2 epochs
    assert steps[0]["lr"] == 0.0  # warmup from 0
    assert {"rec_loss", "quant_loss", "teacher_cos", "grad_norm", "images_per_s", "wd"} <= set(steps[0])
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert len(epochs) == 2 and 0 < epochs[-1]["codebook_codes_used"] <= 64
    assert epochs[-1]["codebook_dead_codes"] == 64 - epochs[-1]["codebook_codes_used"]
    val = [r for r in recs if r["type"] == "val"]
    # validation: rec_loss is the mean of 1 - cos over the same patches as teacher_cos; loss = rec + commitment
    assert len(val) == 2 and val[-1]["teacher_cos"] == pytest.approx(1 - val[-1]["rec_loss"], abs=1e-5)
    assert val[-1]["loss"] == pytest.approx(val[-1]["rec_loss"] + val[-1]["quant_loss"], rel=1e-5)
    assert 1 < val[-1]["codebook_perplexity"] <= val[-1]["codebook_codes_used"]
    # the lr actually applied: official warmup (0.5 epoch = 2 steps, linspace(0, lr, 2)) then cosine to min_lr
    run_cfg = yaml.safe_load((tokenizer / "config.yaml").read_text())["optim"]
    lr, min_lr = run_cfg["lr"], run_cfg["min_lr"]
    want = [0.0, lr] + [min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    assert [r["lr"] for r in steps] == pytest.approx(want, rel=1e-6, abs=1e-12)
    model, kind, cfg = load_model(tokenizer / "model.safetensors")
    assert kind == "vqkd" and cfg["quantizer"]["num_codes"] == 64
    assert bool(model.quantize.embedding.initted)  # k-means init ran and was saved
    codes = model.tokenize(torch.rand(2, 3, 16, 16))
    assert codes.shape == (2, 16) and codes.max() < 64
    assert yaml.safe_load((tokenizer / "config.yaml").read_text())["tokenizer"]["vqkd"]["decoder_depth"] == 1
    assert [s for s, _ in S.list_checkpoints(tokenizer)] == [4, 8]


def test_train_tokenizer_fashion_mnist_idx(tmp_path):
    idx = write_idx(tmp_path / "fmnist")
    vq = {**VQKD, "encoder": {**VQKD["encoder"], "img_size": [28], "in_chans": 1}}
    teacher = {**TEACHER, "model_kwargs": {**TEACHER["model_kwargs"], "img_size": 28}}
    cfg = write_yaml(tmp_path / "c.yaml", {"tokenizer": {"vqkd": vq}, "teacher": teacher,
                                           "data": {**FAST, "kind": "fmnist", "path": str(idx), "channels": 1},
                                           "train": {**TRAIN, "epochs": 1, "output_dir": str(tmp_path / "o")}})
    assert main(["train-tokenizer", "--config", str(cfg), "--optim.lr_reference_batch", "0"]) == 0
    recs = metrics(tmp_path / "o")
    assert sum(r["type"] == "step" for r in recs) == 6  # 48 / 8
    assert any(r["type"] == "val" for r in recs)  # Fashion-MNIST's test split
    _, kind, cfg = load_model(tmp_path / "o")
    assert kind == "vqkd" and cfg["encoder"]["in_chans"] == 1


def test_train_dvae_branch(tmp_path, folder):
    cfg = write_yaml(tmp_path / "d.yaml", {
        "tokenizer": {"type": "dvae", "dvae": {"img_size": 16, "downsample": 4, "vocab_size": 64, "code_dim": 16,
                                               "hidden_dim": 8, "blocks_per_group": 1, "temp_anneal_steps": 4}},
        "data": {**FAST, "kind": "folder", "path": str(folder)},
        "train": {**TRAIN, "epochs": 1, "output_dir": str(tmp_path / "o")}})
    assert main(["train-tokenizer", "--config", str(cfg)]) == 0
    steps = [r for r in metrics(tmp_path / "o") if r["type"] == "step"]
    assert len(steps) == 4 and steps[0]["temperature"] > steps[-1]["temperature"]  # annealed by global step
    model, kind, _ = load_model(tmp_path / "o" / "model.safetensors")
    assert kind == "dvae" and model.tokenize(torch.rand(1, 3, 16, 16)).shape == (1, 16)


def test_two_process_torchrun_keeps_codebooks_identical(tmp_path, folder):
    out = tmp_path / "ddp"
    cfg = tokenizer_cfg(tmp_path, {"kind": "folder", "path": str(folder)}, out, epochs=1, batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "beitv2.cli", "train-tokenizer", "--config", str(cfg), "--train.device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(out)
    sync = [r for r in recs if r["type"] == "rank_sync"]
    assert len(sync) == 1 and len(sync[0]["digests"]) == 2 and sync[0]["in_sync"], sync
    assert sum(r["type"] == "step" for r in recs) == 4  # 32 images / (2 ranks x 4)
    st = S.load_train_state(out / (out / "latest").read_text().strip())
    assert st["world_size"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])  # seed + rank


# ------------------------------------------------------------------------------------------------------ pretrain

def pretrain_cfg(tmp: Path, tokenizer: Path, data: dict, out: Path, **train) -> Path:
    return write_yaml(tmp / "pt.yaml", {"model": MIM, "tokenizer": {"checkpoint": str(tokenizer)},
                                        "data": {**FAST, **data}, "mask": {"num_masking_patches": 6,
                                                                           "min_num_patches": 2},
                                        "optim": {"warmup_epochs": 0.5},
                                        "train": {**TRAIN, "output_dir": str(out), **train}})


def test_pretrain_end_to_end_and_bitwise_resume(tmp_path, tokenizer, folder):
    tok = tokenizer / "model.safetensors"
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pretrain", "--config", str(pretrain_cfg(tmp_path, tok, {"kind": "folder", "path": str(folder)},
                                                           full))]) == 0
    steps = [r for r in metrics(full) if r["type"] == "step"]
    assert len(steps) == 8 and {"mlm_acc_1", "mlm_acc_2", "loss_1", "loss_2"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(steps[0]["loss_1"] + steps[0]["loss_2"], rel=1e-5)
    cfg = pretrain_cfg(tmp_path, tok, {"kind": "folder", "path": str(folder)}, cut)
    # stop mid-epoch after step 3, then resume automatically from ckpt-3 and finish
    assert main(["pretrain", "--config", str(cfg), "--train.stop_after_steps", "3"]) == 0
    assert [s for s, _ in S.list_checkpoints(cut)] == [3] and not (cut / "model.safetensors").exists()
    assert main(["pretrain", "--config", str(cfg), "--train.stop_after_steps", "3"]) == 0  # already there: no-op
    assert [s for s, _ in S.list_checkpoints(cut)] == [3]
    assert main(["pretrain", "--config", str(cfg)]) == 0
    resumed_steps = [r["step"] for r in metrics(cut) if r["type"] == "step"]
    assert resumed_steps == [1, 2, 3, 4, 5, 6, 7, 8]
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model, kind, _ = load_model(full)
    assert kind == "mim"


def make_shards(folder: Path, out: Path, n: int = 3) -> str:
    """The image folder as ``n`` WebDataset shards (``<key>.png`` + ``<key>.cls``); returns their glob."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.rglob("*.png"))
    tars = [tarfile.open(out / f"shard-{s:02d}.tar", "w") for s in range(n)]
    for i, f in enumerate(files):
        for name, data in ((f"{i:04d}.png", f.read_bytes()), (f"{i:04d}.cls", f.parent.name[-1].encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tars[i % n].addfile(info, io.BytesIO(data))
    for t in tars:
        t.close()
    return str(out / "shard-*.tar")


def test_pretrain_on_webdataset_shards_resumes_bitwise(tmp_path, tokenizer, folder):
    """Streaming shards through two data-loader workers: the epoch length comes from the tar headers, and a run
    stopped mid-epoch and resumed ends with the uninterrupted run's weights."""
    tok = tokenizer / "model.safetensors"
    data = {"kind": "wds", "path": make_shards(folder, tmp_path / "shards"), "num_workers": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pretrain", "--config", str(pretrain_cfg(tmp_path, tok, data, full))]) == 0
    assert [r["step"] for r in metrics(full) if r["type"] == "step"] == list(range(1, 9))  # 32 images / 8 x 2
    cfg = pretrain_cfg(tmp_path, tok, data, cut)
    assert main(["pretrain", "--config", str(cfg), "--train.stop_after_steps", "3"]) == 0
    assert [s for s, _ in S.list_checkpoints(cut)] == [3] and not (cut / "model.safetensors").exists()
    assert [r["step"] for r in metrics(cut) if r["type"] == "step"] == [1, 2, 3]
    assert main(["pretrain", "--config", str(cfg)]) == 0
    assert [r["step"] for r in metrics(cut) if r["type"] == "step"] == list(range(1, 9))
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_tokenizer_and_finetune_on_webdataset_shards(tmp_path, folder, capsys):
    shards = make_shards(folder, tmp_path / "shards", n=2)
    out = tmp_path / "tok"
    cfg = tokenizer_cfg(tmp_path, {"kind": "wds", "path": shards, "num_samples": 48}, out, epochs=1)
    assert main(["train-tokenizer", "--config", str(cfg)]) == 0
    assert [r["step"] for r in metrics(out) if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]  # 48 samples / 8
    ft = ["finetune", "--model.random_init", "true", "--model.preset", "vit_tiny", "--data.kind", "wds",
          "--data.path", shards, "--data.num_samples", "16", "--data.num_workers", "0", "--train.epochs", "1",
          "--train.batch_size", "8", "--train.progress", "false", "--train.output_dir", str(tmp_path / "ft")]
    assert main(ft) == 2
    assert "model.num_classes: required with data.kind wds" in capsys.readouterr().err
    assert main(ft + ["--model.num_classes", "2"]) == 0
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["global_step"] == 2


def test_pretrain_fashion_mnist_idx_reports_accuracy(tmp_path):
    idx = write_idx(tmp_path / "fmnist", n_train=32)
    vq = {**VQKD, "encoder": {**VQKD["encoder"], "img_size": [28], "in_chans": 1}}
    from beitv2.checkpoint import save_model
    from beitv2.config import from_dict
    from beitv2.models.vqkd import VQKD as VQKDModel
    from beitv2.models.vqkd import VQKDConfig

    vcfg = from_dict(VQKDConfig, vq)
    save_model(tmp_path / "tok.safetensors", VQKDModel(vcfg), "vqkd", vcfg)
    mim = {**MIM, "backbone": {**MIM["backbone"], "img_size": [28], "in_chans": 1}}
    cfg = write_yaml(tmp_path / "c.yaml", {"model": mim, "tokenizer": {"checkpoint": str(tmp_path / "tok.safetensors")},
                                           "data": {**FAST, "kind": "fmnist", "path": str(idx), "channels": 1},
                                           "aug": {"normalize": "inception"},
                                           "mask": {"num_masking_patches": 18, "min_num_patches": 4},
                                           "train": {**TRAIN, "epochs": 1, "output_dir": str(tmp_path / "o")}})
    assert main(["pretrain", "--config", str(cfg)]) == 0
    recs = metrics(tmp_path / "o")
    ep = [r for r in recs if r["type"] == "epoch"][0]
    steps = [r for r in recs if r["type"] == "step"]
    # the epoch record is the mean of its steps; at init both heads predict ~uniformly over the 64 codes
    for k in ("loss", "mlm_acc_1", "mlm_acc_2", "loss_1"):
        assert ep[k] == pytest.approx(sum(r[k] for r in steps) / len(steps), rel=1e-5), k
    assert steps[0]["loss_1"] == pytest.approx(math.log(64), rel=0.05)
    assert steps[0]["loss_2"] == pytest.approx(math.log(64), rel=0.05)


def test_corrupt_images_are_skipped_and_reported(tmp_path, tokenizer, caplog):
    data = make_folder(tmp_path / "imgs", n_per_class=12, corrupt=3)
    cfg = pretrain_cfg(tmp_path, tokenizer / "model.safetensors", {"kind": "folder", "path": str(data)},
                       tmp_path / "o", epochs=1)
    with caplog.at_level(logging.WARNING, logger="beitv2.data"):
        assert main(["pretrain", "--config", str(cfg)]) == 0
    ep = [r for r in metrics(tmp_path / "o") if r["type"] == "epoch"][0]
    seen = ep["skipped_images"]
    assert 1 <= seen <= 3  # the broken files that fell into the 3 full batches of 8 (27 files)
    assert "broken" in caplog.text


# ---------------------------------------------------------------------------------------------- validation

def test_bad_config_rejected_before_compute(tmp_path, tokenizer, folder, capsys):
    out = tmp_path / "never"
    cfg = pretrain_cfg(tmp_path, tokenizer / "model.safetensors", {"kind": "folder", "path": str(folder)}, out)
    assert main(["pretrain", "--config", str(cfg), "--optim.lr", "-1"]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(cfg), "--mask.num_masking_patches", "17"]) == 2
    assert "mask.num_masking_patches: 17 masked patches > 16 patches" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(cfg), "--model.backbone.patch_size", "8"]) == 2
    assert "tokenizer grid 4x4 != model grid 2x2" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(cfg), "--data.path", str(tmp_path / "missing")]) == 2
    assert "data.path: image folder not found" in capsys.readouterr().err
    assert main(["train-tokenizer", "--preset", "vqkd_tiny_fmnist", "--train.batch_size", "0"]) == 2
    assert "train.batch_size: must be >= 1" in capsys.readouterr().err
    assert main(["train-tokenizer", "--preset", "no_such_preset"]) == 2
    assert "preset: unknown recipe" in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for opt_name in ("--optim.lr", "--optim.official_no_decay", "--train.resume", "--train.accum_steps",
                     "--mask.num_masking_patches", "--model.backbone.depth", "--tokenizer.checkpoint", "--preset"):
        assert opt_name in text
    assert "(default: 0.0015)" in text and "(default: 75)" in text


@pytest.mark.parametrize("name", ["vqkd_base_clip_in1k", "vqkd_tiny_fmnist", "beitv2_base_pt1k_1600e",
                                  "beitv2_base_pt1k_300e", "beitv2_large_pt1k", "beitv2_tiny_fmnist"])
def test_presets_parse(name):
    """Every YAML preset maps onto its command's config (paths left for the user are the only errors)."""
    from beitv2.commands._training import load_recipe
    from beitv2.commands.pretrain import PretrainConfig
    from beitv2.commands.train_tokenizer import TrainTokenizerConfig
    from beitv2.config import from_dict

    cls = TrainTokenizerConfig if name.startswith("vqkd") else PretrainConfig
    cfg = from_dict(cls, load_recipe(name))
    if cls is PretrainConfig:
        assert cfg.model.vocab_size in (512, 8192) and cfg.optim.lr == 1.5e-3
    else:
        assert cfg.tokenizer.type == "vqkd"
