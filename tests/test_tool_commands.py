"""`beitv2 tokenize`, `beitv2 atlas` and `beitv2 report` on real (tiny) files."""

import json

import numpy as np
import pytest
import torch
from _helpers import write_fmnist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from beitv2.checkpoint import save_model
from beitv2.cli import main
from beitv2.data import EvalTransform, FashionMNIST
from beitv2.models.architectures import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    tok = build_model("vqkd_tiny", quantizer={"num_codes": 64, "code_dim": 32})
    save_model(d / "tok.safetensors", tok)
    return d, tok.eval(), write_fmnist(d / "fmnist", 12, 6)


def test_tokenize_fmnist_to_safetensors_matches_the_model(files, capsys):
    d, tok, root = files
    out = d / "codes.safetensors"
    assert main(["tokenize", "--tokenizer.checkpoint", str(d / "tok.safetensors"), "--data.kind", "fmnist",
                 "--data.path", str(root), "--data.num_workers", "0", "--out.path", str(out), "--out.batch_size",
                 "5", "--no-out.progress"]) == 0
    t = load_file(str(out))
    assert t["codes"].shape == (12, 7, 7) and t["codes"].dtype == torch.int32
    ds = FashionMNIST(root, train=True, channels=3)
    tf = EvalTransform((28, 28), 28, "bicubic", normalize="none", output="float")
    images = torch.stack([tf(ds[i][0]) for i in range(12)])
    with torch.no_grad():
        expected = tok.tokenize(images).reshape(12, 7, 7)
    assert torch.equal(t["codes"].long(), expected)
    assert t["labels"].tolist() == [i % 10 for i in range(12)]
    assert int(t["counts"].sum()) == 12 * 49 and t["counts"].numel() == 64
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ids"]) == list(range(12))
    stats = json.loads((d / "codes.safetensors.json").read_text())
    assert stats["codes_used"] == int((t["counts"] > 0).sum()) and stats["num_images"] == 12
    assert stats["dead_codes"] == 64 - stats["codes_used"] and 1 <= stats["perplexity"] <= 64


def test_tokenize_folder_to_npz_with_path_ids_and_bad_file(files, tmp_path):
    d, _, _ = files
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "codes.npz"
    assert main(["tokenize", "--tokenizer.checkpoint", str(d / "tok.safetensors"), "--data.path", str(folder),
                 "--data.num_workers", "0", "--out.path", str(out), "--no-out.progress"]) == 0
    z = np.load(out)
    assert z["codes"].shape == (3, 7, 7)
    assert sorted(z["ids"].tolist()) == ["im0.png", "im1.png", "im2.png"]


def test_tokenize_rejects_a_non_tokenizer(files, capsys, tmp_path):
    d, _, root = files
    save_model(tmp_path / "vit.safetensors", build_model("vit_tiny"))
    assert main(["tokenize", "--tokenizer.checkpoint", str(tmp_path / "vit.safetensors"), "--data.kind", "fmnist",
                 "--data.path", str(root)]) == 2
    assert "tokenizer.checkpoint" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer.checkpoint", str(d / "tok.safetensors"), "--data.kind", "fmnist",
                 "--out.path", "codes.txt"]) == 2


def test_atlas_draws_the_most_used_codes(files):
    d, _, root = files
    png = d / "atlas.png"
    assert main(["atlas", "--tokenizer.checkpoint", str(d / "tok.safetensors"), "--data.kind", "fmnist",
                 "--data.path", str(root), "--data.num_workers", "0", "--atlas.out", str(png), "--atlas.top_k", "4",
                 "--no-atlas.progress"]) == 0
    assert png.stat().st_size > 1000
    info = json.loads((d / "atlas.png.json").read_text())
    assert len(info["codes"]) == 4 and info["num_patches"] == 6 * 49
    assert info["counts"] == sorted(info["counts"], reverse=True)


def test_report_draws_curves_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"type": "step", "step": s, "epoch": 0, "loss": 5.0 / (s + 1), "mlm_acc_1": s / 10} for s in range(5)]
    rows.append({"type": "val", "step": 4, "epoch": 0, "acc1": 30.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["report", str(run)]) == 0
    assert (run / "training_curves.png").stat().st_size > 1000
    assert "training loss" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run_dir" in capsys.readouterr().err
