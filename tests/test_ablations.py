"""The papers' ablations as options of `beitv2 pretrain` (pixel / feature targets, random masking, no aggregation,
separate head, dVAE tokenizer) and the Fashion-MNIST reproduction script, on tiny real models and real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import load_benchmark
from idx_files import write_idx_split
from PIL import Image

from beitv2.checkpoint import load_model, load_state_dict, save_model
from beitv2.cli import main
from beitv2.config import from_dict
from beitv2.mim_targets import FeatureTarget, PixelTarget
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.dvae import DiscreteVAE, DVAEConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig, pixel_targets
from beitv2.tasks import MIMTask
from beitv2.teachers import TeacherConfig, build_teacher

VIT = {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 0.1}
MIM = {"backbone": VIT, "vocab_size": 32, "early_layers": 1, "head_layers": 1}
TRAIN = {"epochs": 1, "batch_size": 8, "log_every_steps": 1, "progress": False, "tensorboard": False,
         "device": "cpu"}


def make_folder(root: Path, n_per_class: int = 8, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}/{i}.png")
    return root


def write_idx(root: Path, n_train: int = 60, n_test: int = 30) -> Path:
    """Fashion-MNIST-format IDX files: 28x28 images whose brightness depends on the label (0..9)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx_split(root, prefix, imgs, labels)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny 'vit' checkpoint made by this project: the teacher for feature targets (width 24)."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(16,), patch_size=4, embed_dim=24, depth=1, num_heads=2, use_mean_pooling=True)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(path, BEiTViT(cfg), "vit", cfg)
    return path


def pretrain(tmp: Path, folder: Path, model: dict, name: str, **extra) -> tuple[int, Path]:
    out = tmp / name
    cfg = {"model": {**MIM, **model}, "data": {"kind": "folder", "path": str(folder), "num_workers": 0},
           "mask": {"num_masking_patches": 6, "min_num_patches": 2, **extra.pop("mask", {})},
           "optim": {"warmup_epochs": 0.5}, "train": {**TRAIN, "output_dir": str(out)}, **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["pretrain", "--config", str(path)]), out


def steps(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def test_pixel_target_pretrain(tmp_path, folder):
    rc, out = pretrain(tmp_path, folder, {"target": "pixels", "patch_aggregation": False}, "pix")
    assert rc == 0
    recs = steps(out)
    assert len(recs) == 2 and "loss_2" not in recs[0] and "mlm_acc_1" not in recs[0]
    # per-patch normalised targets have unit variance, so an untrained head's MSE starts near 1
    assert 0.5 < recs[0]["loss_1"] < 3.0
    model, kind, cfg = load_model(out)
    assert kind == "mim" and cfg["target"] == "pixels"
    assert model.lm_head.out_features == 4 * 4 * 3 and model.cls_pt_layers is None


def test_pixel_task_regresses_the_masked_patches_of_the_model_view():
    torch.manual_seed(0)
    cfg = from_dict(MIMConfig, {**MIM, "target": "pixels", "patch_aggregation": False})
    model = BEiTv2ForMIM(cfg)
    task = MIMTask(model, PixelTarget(model.config))
    images = torch.randn(3, 3, 16, 16)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, [0, 5, 15]] = True
    loss, _ = task({"image": images, "mask": mask})
    out = model(images, mask)[0]
    want = ((out - pixel_targets(images, 4, True)[mask]) ** 2).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    # the un-normalised variant regresses the raw values
    model.config.norm_pix_loss = False
    loss_raw, _ = task({"image": images, "mask": mask})
    assert torch.allclose(loss_raw, ((out - pixel_targets(images, 4, False)[mask]) ** 2).mean(), atol=1e-5)


def test_feature_target_pretrain_and_task(tmp_path, folder, teacher_file):
    teacher = {"kind": "beitv2", "name_or_path": str(teacher_file), "bf16": False}
    rc, out = pretrain(tmp_path, folder, {"target": "features", "target_dim": 24, "patch_aggregation": True},
                       "feat", teacher=teacher)
    assert rc == 0
    recs = steps(out)
    assert {"loss_1", "loss_2", "target_cos"} <= set(recs[0])
    assert recs[0]["loss"] == pytest.approx(recs[0]["loss_1"] + recs[0]["loss_2"], rel=1e-4)
    assert recs[0]["loss_1"] == pytest.approx(1.0 - recs[0]["target_cos"], abs=1e-5)  # 1 - cosine of head 1
    assert recs[0]["loss_1"] == pytest.approx(1.0, abs=0.2)  # an untrained head is ~orthogonal to the teacher
    model, kind, cfg = load_model(out)
    assert cfg["target"] == "features" and model.lm_head.out_features == 24
    # the task's loss is 1 - cos(prediction, teacher features of the second view) at the masked patches
    t = build_teacher(from_dict(TeacherConfig, teacher), (4, 4))
    task = MIMTask(model, FeatureTarget(t))
    images, view2 = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3:9] = True
    loss, metrics = task({"image": images, "tokenizer_image": view2, "mask": mask})
    target = t(view2)[mask]
    outs = model(images, mask)
    want = sum((1 - torch.cosine_similarity(o, target, dim=-1)).mean() for o in outs)
    assert torch.allclose(loss, want, atol=1e-4)
    assert not any(p.requires_grad for p in task.target.teacher.parameters())
    # a target width that differs from the teacher's is refused, naming the field
    rc, _ = pretrain(tmp_path, folder, {"target": "features", "target_dim": 16}, "feat_bad", teacher=teacher)
    assert rc == 2


def test_random_masking_trains(tmp_path, folder):
    rc, out = pretrain(tmp_path, folder, {"target": "pixels"}, "rand", mask={"kind": "random"})
    assert rc == 0 and len(steps(out)) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["mask"]["kind"] == "random"


def test_no_aggregation_and_separate_head_change_the_model(tmp_path, folder):
    rc, out = pretrain(tmp_path, folder, {"target": "pixels", "patch_aggregation": True, "shared_lm_head": False,
                                          "head_layers": 2}, "sep")
    assert rc == 0
    keys = load_state_dict(out / "model.safetensors").keys()
    assert any(k.startswith("cls_pt_lm_head.") for k in keys) and any(k.startswith("cls_pt_norm.") for k in keys)
    assert {k.split(".")[1] for k in keys if k.startswith("cls_pt_layers.")} == {"0", "1"}
    assert "loss_2" in steps(out)[0]


def test_pretrain_from_a_dvae_tokenizer(tmp_path, folder):
    torch.manual_seed(0)
    dcfg = DVAEConfig(img_size=16, in_chans=3, downsample=4, vocab_size=32, code_dim=8, hidden_dim=8,
                      blocks_per_group=1, temp_anneal_steps=4)
    save_model(tmp_path / "dvae.safetensors", DiscreteVAE(dcfg), "dvae", dcfg)
    rc, out = pretrain(tmp_path, folder, {"target": "tokens", "patch_aggregation": False}, "dv",
                       tokenizer={"checkpoint": str(tmp_path / "dvae.safetensors")})
    assert rc == 0
    recs = steps(out)
    assert "mlm_acc_1" in recs[0]
    assert recs[0]["loss_1"] == pytest.approx(math.log(32), rel=0.05)  # untrained head: ~uniform over 32 dVAE codes
    # a dVAE vocabulary that differs from the model's is refused before compute
    rc, _ = pretrain(tmp_path, folder, {"target": "tokens", "vocab_size": 64}, "dv_bad",
                     tokenizer={"checkpoint": str(tmp_path / "dvae.safetensors")})
    assert rc == 2


def test_tokenizer_checkpoint_rules(tmp_path, folder, capsys):
    rc, _ = pretrain(tmp_path, folder, {"target": "tokens"}, "no_tok")
    assert rc == 2 and "tokenizer.checkpoint" in capsys.readouterr().err
    rc, _ = pretrain(tmp_path, folder, {"target": "pixels"}, "extra_tok", tokenizer={"checkpoint": "x.safetensors"})
    assert rc == 2 and "unused with model.target pixels" in capsys.readouterr().err


def test_reproduce_script_smoke(tmp_path, capsys):
    mod = load_benchmark("reproduce_fmnist")
    idx = write_idx(tmp_path / "fmnist")
    out = tmp_path / "res"
    argv = ["--budget", "tiny", "--subset", "40", "--rows", "pixels", "--out", str(out),
            "--data-path", str(idx), "--device", "cpu", "--workers", "0"]
    assert mod.main(argv) == 0
    assert {"results.md", "results.json", "results.png"} <= {p.name for p in out.iterdir()}
    md = (out / "results.md").read_text()
    assert ("| row | linear probe top-1 | k-NN top-1 | fine-tune top-1 | codebook usage | wall time (min) |"
            in md)
    assert "--budget tiny --subset 40" in md and "not run" in md  # the other rows are listed as not run
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"pixels"}
    for r in res["rows"].values():
        assert {"linprobe_top1", "knn_top1", "finetune_top1", "wall_s"} <= set(r)
        assert all(0 <= r[k] <= 100 for k in ("linprobe_top1", "knn_top1", "finetune_top1"))
    assert 0 < res["rows"]["pixels"]["pretrain_s"] <= res["rows"]["pixels"]["wall_s"]
    with Image.open(out / "results.png") as im:
        assert im.size[0] > 100
    # resumable: a second run skips the finished rows
    capsys.readouterr()
    assert mod.main(argv) == 0
    assert capsys.readouterr().out.count("done, skipped") == 1
    # another budget in the same folder is refused
    with pytest.raises(SystemExit):
        mod.main([*argv[:3], "41", *argv[4:]])


def test_reproduce_script_raw_pixels_row_and_seeds(tmp_path):
    mod = load_benchmark("reproduce_fmnist")
    idx = tmp_path / "fmnist"
    idx.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 200)):  # class c: a bright bar at rows 2c+4..2c+7 on faint noise
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            imgs[i, 2 * c + 4: 2 * c + 8, 4:24] = 230
        write_idx_split(idx, prefix, imgs, labels)
    out = tmp_path / "res"
    argv = ["--budget", "tiny", "--subset", "600", "--rows", "raw_pixels,random", "--seeds", "2", "--out", str(out),
            "--data-path", str(idx), "--device", "cpu", "--workers", "0"]
    assert mod.main(argv) == 0
    seeds = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [s["seed"] for s in seeds] == [0, 1]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and set(res["rows"]) == {"raw_pixels", "random"}
    raw = res["rows"]["raw_pixels"]
    # the label sets the brightness: pixels separate the classes far above chance (10%)
    assert raw["linprobe_top1"] > 50 and raw["knn_top1"] > 50 and raw["finetune_top1"] is None
    for name, row in res["rows"].items():
        per = [s["rows"][name]["linprobe_top1"] for s in seeds]
        assert row["linprobe_top1"] == pytest.approx(sum(per) / 2)
        assert row["linprobe_top1_std"] == pytest.approx(abs(per[0] - per[1]) / 2 ** 0.5)
    md = (out / "results.md").read_text()
    cell = f"{raw['linprobe_top1']:.1f} ± {raw['linprobe_top1_std']:.1f}"
    assert f"| raw pixels (normalised, no network) | {cell} |" in md
    assert "Mean ± standard deviation over seeds [0, 1]" in md


def test_reproduce_script_cnn_teacher_rows(tmp_path):
    """The shared stages of the quickstart's recipe: the CNN teacher, VQ-KD from its layer-normed map, the teacher
    row read from its pooled map (no fine-tune column) and the feature-regression row against it."""
    mod = load_benchmark("reproduce_fmnist")
    idx = write_idx(tmp_path / "fmnist")
    out = tmp_path / "res"
    assert mod.main(["--budget", "tiny", "--subset", "80", "--rows", "vqkd,teacher,features", "--out", str(out),
                     "--data-path", str(idx), "--device", "cpu", "--workers", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"vqkd", "teacher", "features"} and not res.get("failed")
    assert res["rows"]["teacher"]["finetune_top1"] is None
    assert res["rows"]["features"]["finetune_top1"] is not None
    assert 0 < res["rows"]["vqkd"]["codebook"]["codes_used"] <= 64
    vqkd_cfg = yaml.safe_load((out / "configs" / "vqkd.yaml").read_text())
    assert vqkd_cfg["teacher"]["feature_norm"] == "layernorm" and vqkd_cfg["tokenizer"]["vqkd"]["teacher_dim"] == 96
    teacher = yaml.safe_load((out / "runs" / "teacher" / "config.yaml").read_text())
    assert teacher["net"]["name"] == "resnet10t"
    assert res["teacher_top1"] == json.loads((out / "runs" / "teacher" / "metrics.json").read_text())["acc1"]


def test_reproduce_script_only_seed_runs_one_seed_and_is_checked(tmp_path, capsys):
    mod = load_benchmark("reproduce_fmnist")
    idx = write_idx(tmp_path / "fmnist")
    out = tmp_path / "res"
    argv = ["--budget", "tiny", "--subset", "40", "--rows", "raw_pixels", "--seeds", "2", "--out", str(out),
            "--data-path", str(idx), "--device", "cpu", "--workers", "0"]
    assert mod.main([*argv, "--only-seed", "1"]) == 0
    assert (out / "seed1" / "results.json").is_file() and not (out / "seed0").exists()
    assert not (out / "results.json").exists()  # no mean over one seed
    capsys.readouterr()
    assert mod.main(argv) == 0  # seed 0 runs, seed 1 is skipped, the mean is written
    assert capsys.readouterr().out.count("done, skipped") == 1 and (out / "results.json").is_file()
    for bad in (["--only-seed", "2"], ["--only-seed", "-1"]):
        with pytest.raises(SystemExit):
            mod.parse_args([*argv, *bad])


def test_reproduce_full_budget_pretrains_with_the_quickstart_recipe(tmp_path):
    """The ablation's `full` budget claims the quickstart's MIM recipe: the two must not drift apart."""
    from beitv2.demo import FULL

    mod = load_benchmark("reproduce_fmnist")
    b = mod.BUDGETS["full"]
    assert (b.width, b.depth, b.heads) == FULL.mim_vit and b.early_layers == FULL.mim_early_layers
    assert (b.mim_batch, b.mim_lr, b.mask_patches, b.mask_min_block, b.mask_max_block, b.crop_scale) == (
        FULL.mim_batch, FULL.mim_lr, FULL.mask_patches, FULL.mask_min_block, FULL.mask_max_block, FULL.mim_crop_scale)
    # and the written pre-training config carries them (a row's own mask override still wins)
    plan = mod.Plan(b, tmp_path, str(tmp_path), "cpu", 0, seed=0)
    row = next(r for r in mod.ROWS if r.name == "vqkd")
    cfg = yaml.safe_load(Path(plan.pretrain(row, tmp_path / "tok.safetensors", None)[-1]).read_text())
    assert cfg["mask"] == {"kind": "block", "num_masking_patches": 20, "min_num_patches": FULL.mask_min_block,
                           "max_num_patches": FULL.mask_max_block}
    assert cfg["aug"]["min_crop_scale"] == FULL.mim_crop_scale and cfg["optim"]["lr"] == FULL.mim_lr
    random_row = next(r for r in mod.ROWS if r.name == "vqkd_random")
    assert yaml.safe_load(Path(plan.pretrain(random_row, tmp_path / "tok.safetensors", None)[-1]).read_text()
                          )["mask"]["kind"] == "random"
