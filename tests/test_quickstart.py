"""`beitv2 quickstart --fast` end to end on real Fashion-MNIST, plus the report figures on their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import load_benchmark
from builders import tiny_backbone
from idx_files import write_idx_split
from PIL import Image

from beitv2.cli import main
from beitv2.data import FASHION_MNIST_ROOT
from beitv2.masking import BlockwiseMaskGenerator
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.report import attention_figure, mask_examples, plot_training_curves, write_report

FIGURES = ("training_curves", "codebook_atlas", "attention", "attention_cls", "masks")


def _write_idx(folder: Path, prefix: str, n: int, rng: np.random.Generator) -> None:
    """Small synthetic Fashion-MNIST-format files: class c is a bright bar at row 2c (learnable, not chance)."""
    labels = np.arange(n, dtype=np.uint8) % 10
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4: 2 * c + 8, 4:24] = 230
    write_idx_split(folder, prefix, images, labels)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[int, Path]:
    """One `quickstart --fast` run shared by the checks below (real Fashion-MNIST when installed)."""
    out = tmp_path_factory.mktemp("quickstart")
    data = FASHION_MNIST_ROOT
    if not (Path(data) / "train-images-idx3-ubyte.gz").is_file():
        data = str(out / "idx")
        Path(data).mkdir()
        rng = np.random.default_rng(0)
        _write_idx(Path(data), "train", 3000, rng)
        _write_idx(Path(data), "t10k", 600, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a caller's setting other than --threads, so that restoring it shows
    try:
        rc = main(["quickstart", "--fast", "--out", str(out / "report"), "--data-path", data, "--threads", "1"])
        assert torch.get_num_threads() == threads + 1  # the command restores the caller's setting
    finally:
        torch.set_num_threads(threads)
    return rc, out / "report"


def test_fast_run_succeeds_and_times_every_stage(fast_run):
    rc, out = fast_run
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for stage in ("teacher", "tokenizer (VQ-KD)", "pre-training (BEiT v2 MIM)", "evaluation (linear probe, k-NN)",
                  "report", "total"):
        assert m["timings_s"][stage] > 0, stage
    assert m["teacher"]["stand_in"] is True
    for stage in ("train-tokenizer", "pretrain", "linprobe.beitv2", "knn.random_init"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    # no command trains the stand-in teacher: its config is the trainer's record in its run folder, not in configs/
    assert (out / "teacher" / "config.yaml").is_file() and not (out / "configs" / "teacher.yaml").exists()


def test_pretrain_stage_masks_small_blocks_of_the_whole_image(fast_run):
    """The plan's masking and crop reach the pre-training config, and its generator keeps every block small."""
    from beitv2.demo import FAST
    from beitv2.masking import build_mask_generator

    _, out = fast_run
    cfg = yaml.safe_load((out / "configs" / "pretrain.yaml").read_text())
    assert cfg["mask"] == {"kind": "block", "num_masking_patches": FAST.mask_patches,
                           "min_num_patches": FAST.mask_min_block, "max_num_patches": FAST.mask_max_block}
    assert cfg["aug"]["min_crop_scale"] == FAST.mim_crop_scale == 1.0
    m = cfg["mask"]
    gen = build_mask_generator(m["kind"], 7, m["num_masking_patches"], m["min_num_patches"], m["max_num_patches"])
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(200):
        assert gen(rng).sum() == m["num_masking_patches"]
        blocks.append(gen.last_num_blocks)
    # 20 patches in blocks of at most 6 take at least 4 rectangles (an unbounded first block often takes 10-20)
    assert min(blocks) >= 4, blocks


def test_accuracies_above_chance(fast_run):
    _, out = fast_run
    m = json.loads((out / "metrics.json").read_text())
    rows = m["results"]
    assert set(rows) == {"BEiT v2 (pre-trained)", "random init (same ViT)", "raw pixels", "teacher"}
    # the table is what each evaluation stage measured (k-NN row: k = 20 at the probed layer, best k beside it)
    folders = {"BEiT v2 (pre-trained)": "beitv2", "random init (same ViT)": "random_init", "teacher": "teacher"}
    for name, folder in folders.items():
        lp = json.loads((out / "eval" / folder / "linprobe" / "metrics.json").read_text())
        knn = json.loads((out / "eval" / folder / "knn" / "metrics.json").read_text())
        assert lp["num_val"] == knn["num_val"] == 400, name  # --fast scores on 400 test images
        assert rows[name]["linprobe_acc1"] == lp["acc1"], name
        assert rows[name]["knn_acc1"] == knn["layers"][str(knn["best_layer"])]["20"]["acc1"], name
        assert rows[name]["knn_best"] == {"acc1": knn["acc1"], "k": knn["best_k"]}, name
    # a trained teacher is far from the 10% of chance on 10 classes (an untrained one stays near it)
    assert rows["teacher"]["linprobe_acc1"] > 20.0 and rows["teacher"]["knn_acc1"] > 20.0, rows["teacher"]
    assert m["teacher"]["classifier_acc1"] > 10.0
    assert m["linprobe_gain_over_random_init"] == pytest.approx(
        rows["BEiT v2 (pre-trained)"]["linprobe_acc1"] - rows["random init (same ViT)"]["linprobe_acc1"])
    # the raw-pixel floor: the same probe and k-NN on the 784 normalised pixels, far above chance on these images
    raw = rows["raw pixels"]
    assert raw["linprobe_acc1"] > 50.0 and raw["knn_acc1"] > 50.0, raw
    assert json.loads((out / "eval" / "raw_pixels" / "knn" / "metrics.json").read_text())["num_train"] == 1000
    assert 1 <= m["tokenizer"]["codebook_codes_used"] <= 64
    assert 0.0 < m["pretrain"]["mlm_acc_1"] <= 1.0


def test_report_md_holds_the_table_and_the_stand_in_note(fast_run):
    _, out = fast_run
    text = (out / "report.md").read_text()
    assert "| backbone | linear probe top-1 (%) | k-NN top-1, k=20 (%)" in text
    m = json.loads((out / "metrics.json").read_text())
    lp = m["results"]["BEiT v2 (pre-trained)"]["linprobe_acc1"]
    assert f"| BEiT v2 (pre-trained) | {lp:.2f} |" in text
    assert "| random init (same ViT) |" in text and "| teacher |" in text
    raw = m["results"]["raw pixels"]
    assert f"| raw pixels | {raw['linprobe_acc1']:.2f} | {raw['knn_acc1']:.2f} |" in text
    assert "stand-in" in text and "10% of the training labels" not in text  # fast: a count, said as such
    assert "500 images of the training labels" in text
    assert "blockwise, 20 of 49 patches" in text and "blocks of 2-6 patches" in text
    assert "views: `the whole image, random flips`" in text
    for stage in ("teacher", "tokenizer (VQ-KD)", "pre-training (BEiT v2 MIM)"):
        assert f"| {stage} |" in text
    for name in FIGURES:
        assert f"figures/{name}.png" in text


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_real_images(fast_run, name):
    _, out = fast_run
    path = out / "figures" / f"{name}.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= 400 and im.height >= 150, im.size
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.std() > 10  # not a blank canvas


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    rc = main(["quickstart", "--fast", "--out", str(tmp_path / "r"), "--data-path", str(tmp_path)])
    assert rc == 2
    msg = capsys.readouterr().out
    assert "no Fashion-MNIST IDX files" in msg and str(tmp_path) in msg
    assert not (tmp_path / "r").exists()  # failed before any work


# ------------------------------------------------------------------------------- report functions on their own

def test_attention_figure_rows_sum_to_one_and_queries_validated(tmp_path):
    model = tiny_backbone(seed=0, in_chans=1).eval()
    x = torch.rand(3, 1, 16, 16)
    info = attention_figure(model, x, tmp_path / "a.png", layer=0, query=(1, 2))
    assert (tmp_path / "a.png").stat().st_size > 5000
    assert info["layer"] == 1 and info["query"] == "patch (1, 2)"
    assert 0 < info["entropy"] <= info["uniform_entropy"] + 1e-5
    assert torch.allclose(model.attention_maps(x, 0).sum(-1), torch.ones(3, 2, 17), atol=1e-5)
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        attention_figure(model, x, tmp_path / "b.png", query=(4, 0))


def test_mask_examples_report_exact_counts(tmp_path):
    info = mask_examples(BlockwiseMaskGenerator((7, 7), 20, min_num_patches=4), tmp_path / "m.png", n=6)
    assert info["masked_per_image"] == [20] * 6
    assert all(b >= 1 for b in info["blocks"])
    assert (tmp_path / "m.png").stat().st_size > 3000


def test_training_curves_pick_panels_from_the_logged_keys(tmp_path):
    rows = [{"type": "step", "step": s, "loss": 5.0 / s, "mlm_acc_1": 0.01 * s} for s in range(1, 30)]
    rows.append({"type": "val", "step": 29, "acc1": 55.0})
    p = tmp_path / "run" / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    panels = plot_training_curves([p], tmp_path / "c.png")
    assert panels == ["training loss", "MIM accuracy (masked patches)", "validation top-1 (%)"]
    q = tmp_path / "empty.jsonl"
    q.write_text(json.dumps({"type": "step", "step": 1, "other": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no plottable metrics"):
        plot_training_curves({"x": q}, tmp_path / "d.png")


def test_write_report_table_and_totals(tmp_path):
    path = write_report(tmp_path / "r.md", results={"a": {"lp": 81.234, "knn": None}}, timings={"s1": 1.5, "s2": 2.0},
                        settings={"x": {"y": 1}}, notes=["careful"], figures={"fig": "f.png"})
    text = path.read_text()
    assert "| a | 81.23 | n/a |" in text
    assert "| **total** | **3.5** |" in text
    assert "> **Note:** careful" in text and "![fig](f.png)" in text and "  - y: `1`" in text


def test_a_user_given_teacher_is_used_as_is_and_not_trained(tmp_path):
    import argparse

    from beitv2.checkpoint import save_model
    from beitv2.config import ConfigError
    from beitv2.demo import FAST, build_teacher_spec

    cfg = ViTConfig(img_size=(28,), patch_size=4, in_chans=1, embed_dim=48, depth=1, num_heads=2)
    path = tmp_path / "my_vit.safetensors"
    save_model(path, BEiTViT(cfg), "vit", cfg)
    args = argparse.Namespace(teacher=str(path), teacher_kind="beitv2", teacher_checkpoint="", seed=0)
    spec, dim, ckpt, desc = build_teacher_spec(args, FAST, "", tmp_path / "out", tmp_path / "cfg", False)
    assert spec == {"kind": "beitv2", "name_or_path": str(path)}
    assert dim == 48 and ckpt == path and desc.startswith("user-given beitv2 teacher")
    assert not (tmp_path / "out" / "teacher").exists()  # nothing trained
    args.teacher = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="teacher.name_or_path"):
        build_teacher_spec(args, FAST, "", tmp_path / "out", tmp_path / "cfg", False)


def test_grid_features_keep_where_the_patches_are():
    from beitv2.eval.features import feature_dim, layer_features

    model = tiny_backbone(seed=0, in_chans=1).eval()  # 16 px, patch 4: a 4 x 4 grid, width 32
    x = torch.rand(3, 1, 16, 16)
    f = layer_features(model, x, [1, 2], "cls+grid2")
    assert f[2].shape == (3, feature_dim(model, "cls+grid2")) == (3, 32 * 5)
    with torch.no_grad():
        t = model.norm(model.forward_features(x)[0])
    quad = t[:, 1:].reshape(3, 4, 4, 32)[:, :2, 2:].mean(dim=(1, 2))  # top-right 2 x 2 patches -> cell (0, 1)
    assert torch.allclose(f[2][:, :32], t[:, 0], atol=1e-5)
    assert torch.allclose(f[2][:, 32:].reshape(3, 32, 4)[:, :, 1], quad, atol=1e-5)
    # the mean of the four cells is the plain mean-pooled feature
    mean = layer_features(model, x, [2], "cls+mean")[2][:, 32:]
    assert torch.allclose(f[2][:, 32:].reshape(3, 32, 4).mean(-1), mean, atol=1e-5)


def test_plans_long_is_the_full_plan_with_more_mim_epochs(capsys):
    def plan(*flags):
        capsys.readouterr()
        assert main(["quickstart", *flags, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)["plan"]

    full, long = plan(), plan("--plan", "long")
    changed = {"mim_epochs": (3, 8)}
    assert {k: (full[k], long[k]) for k in changed} == changed
    assert {k: v for k, v in long.items() if k not in changed} == {k: v for k, v in full.items() if k not in changed}
    assert plan("--fast") == plan("--plan", "fast") != full
    # the measured recipe: a tokenizer of 2 x 937 steps, probes on the 3x3 grid in every plan, no loader worker
    assert (full["tok_epochs"], full["tok_batch"], full["num_workers"]) == (2, 64, 0)
    assert full["probe_feature"] == plan("--fast")["probe_feature"] == "cls+grid3"
    assert plan("--probe-feature", "cls+mean")["probe_feature"] == "cls+mean"


def test_cnn_teacher_row_is_read_like_the_vits(fast_run):
    """With the grid reading the teacher's row gets its map's mean (in place of a CLS token) and the 3x3 grid, as the
    ViT rows get CLS and their patch grid; the default reading is the mean-pooled map."""
    from beitv2.checkpoint import load_model
    from beitv2.demo import cnn_pooled_encoder

    _, out = fast_run
    ckpt = out / "teacher" / "model.safetensors"
    images = torch.rand(5, 1, 28, 28)
    fmap = load_model(ckpt)[0].eval().forward_features(images).detach()
    mean = cnn_pooled_encoder(ckpt, 2)(images)
    grid = cnn_pooled_encoder(ckpt, 2, "cls+grid3")(images)
    c = fmap.shape[1]
    assert mean.shape == (5, c) and grid.shape == (5, 10 * c)
    assert torch.allclose(mean, fmap.mean((2, 3)), atol=1e-5) and torch.allclose(grid[:, :c], mean, atol=1e-6)
    cell = fmap[:, :, :3, :3].mean((2, 3))  # the 7x7 map's top-left 3x3 cell of adaptive pooling to 3x3
    assert torch.allclose(grid[:, c:].reshape(5, c, 9)[:, :, 0], cell, atol=1e-5)


def test_tokenizer_information_reads_the_codes_alone(fast_run, tmp_path, capsys):
    """benchmarks/tokenizer_information.py: each reading is a function of the codes only, and the quickstart's probe
    protocol scores it (fast plan: 1,000 / 400 images)."""
    from beitv2.checkpoint import load_model

    mod = load_benchmark("tokenizer_information")
    _, out = fast_run
    ckpt = out / "tokenizer" / "model.safetensors"
    tok = load_model(ckpt)[0].eval()
    images = torch.rand(6, 1, 28, 28)
    codes = tok.tokenize(images)
    vectors = mod.code_encoder(tok, mod.READINGS["code vectors"], 4)(images)
    assert torch.equal(vectors, tok.quantize.lookup(codes).flatten(1).float())
    hist = mod.code_encoder(tok, mod.READINGS["code histogram"], 4)(images)
    assert hist.shape == (6, tok.config.quantizer.num_codes) and torch.allclose(hist.sum(1), torch.ones(6))
    counts = torch.nn.functional.one_hot(codes, tok.config.quantizer.num_codes).sum(1)
    assert torch.equal((hist * codes.shape[1]).round().long(), counts)  # how often each code occurs, not where
    root = yaml.safe_load((out / "configs" / "linprobe.beitv2.yaml").read_text())["data"]["path"]
    res = tmp_path / "info.json"
    assert mod.main(["--tokenizer", str(ckpt), "--data-path", root, "--plan", "fast", "--json", str(res),
                     "--threads", "1"]) == 0
    table = capsys.readouterr().out
    got = json.loads(res.read_text())["results"]
    assert set(got) == set(mod.READINGS) and all(f"| {name} |" in table for name in got)
    for name, r in got.items():
        assert 0.0 <= r["linprobe_acc1"] <= 100.0 and 0.0 <= r["knn_acc1"] <= 100.0, (name, r)
    assert got["code vectors"]["linprobe_acc1"] > 20.0  # the codes in place carry the class (chance: 10%)

    assert mod.main(["--tokenizer", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a VQ-KD tokenizer"):
        mod.main(["--tokenizer", str(out / "teacher" / "model.safetensors"), "--data-path", root, "--plan", "fast"])


def test_knn_readings_reproduce_the_reports_knn_rows(fast_run, tmp_path, capsys):
    """benchmarks/knn_readings.py: its plan reading (CLS + 3x3 grid, last block) is the report's k-NN of BEiT v2 and
    of the teacher, its pixels the pixel row; the other readings are scored for every block."""
    mod = load_benchmark("knn_readings")
    _, out = fast_run
    res = tmp_path / "readings.json"
    assert mod.main(["--run", str(out), "--plan", "fast", "--json", str(res), "--threads", "1"]) == 0
    assert "| BEiT v2 | 2 | cls+all |" in capsys.readouterr().out
    rows = json.loads(res.read_text())["rows"]
    report = json.loads((out / "metrics.json").read_text())["results"]
    depth = max(r["block"] for r in rows if r["backbone"] == "BEiT v2")
    pick = {(r["backbone"], r["block"], r["reading"]): r for r in rows}
    student = report["BEiT v2 (pre-trained)"]["knn_acc1"]
    assert pick[("BEiT v2", depth, "cls+grid3")]["knn_acc1"] == pytest.approx(student, abs=0.01)
    assert pick[("teacher", None, "cls+grid3")]["knn_acc1"] == pytest.approx(report["teacher"]["knn_acc1"], abs=0.01)
    assert pick[("raw pixels", None, "pixels")]["knn_acc1"] == pytest.approx(report["raw pixels"]["knn_acc1"], abs=0.01)
    assert len(rows) == depth * len(mod.READINGS) + len(mod.READINGS) + 1
    assert all(0.0 <= r["knn_acc1"] <= 100.0 and 0.0 <= r["knn_std_acc1"] <= 100.0 for r in rows)
    assert mod.main(["--run", str(tmp_path)]) == 2  # not a quickstart folder: one line, no traceback
