"""The ImageNet fine-tuning presets against the official recipes (beit2/get_started_for_image_classification.md).

The official values are written out here from that document, independently of the presets: its base and large
command lines, its per-option notes for pre-trained / intermediate fine-tuned models, and its ImageNet-21k command.
Each preset goes through the real command line (``finetune --preset NAME --print-config``), so it must also parse
and validate.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# preset: lr, epochs, warmup epochs, layer decay, drop path, batch per GPU, accumulation, GPUs, mixup, cutmix,
#         classes (0 = the data's), evaluation every N epochs (0 = none during training)
OFFICIAL = {
    # base command line + notes "for pretrained models" (lr 5e-4, 100 ep, mixup 0.8, cutmix 1.0) and the pre-training
    # length (1600 ep: layer decay 0.6, drop path 0.2; 300 ep: 0.65, 0.1); warmup stays the command's 20
    "beitv2_base_ft1k_pt1600e": dict(lr=5e-4, epochs=100, warmup=20, ld=0.6, dp=0.2, bs=128, accum=1, gpus=8,
                                     mixup=0.8, cutmix=1.0, classes=0, eval_every=1),
    "beitv2_base_ft1k_pt300e": dict(lr=5e-4, epochs=100, warmup=20, ld=0.65, dp=0.1, bs=128, accum=1, gpus=8,
                                    mixup=0.8, cutmix=1.0, classes=0, eval_every=1),
    # large command line (64/GPU, update_freq 2, warmup 5) + notes: lr 2e-4 (1600 ep) / 5e-4 (300 ep), 50 ep,
    # layer decay 0.8 for all, drop path 0.2 for pre-trained models
    "beitv2_large_ft1k_pt1600e": dict(lr=2e-4, epochs=50, warmup=5, ld=0.8, dp=0.2, bs=64, accum=2, gpus=8,
                                      mixup=0.8, cutmix=1.0, classes=0, eval_every=1),
    "beitv2_large_ft1k_pt300e": dict(lr=5e-4, epochs=50, warmup=5, ld=0.8, dp=0.2, bs=64, accum=2, gpus=8,
                                     mixup=0.8, cutmix=1.0, classes=0, eval_every=1),
    # the two command lines themselves (from the ImageNet-21k intermediate fine-tuned checkpoints)
    "beitv2_base_ft21kto1k": dict(lr=5e-5, epochs=30, warmup=20, ld=0.75, dp=0.1, bs=128, accum=1, gpus=8,
                                  mixup=0.0, cutmix=0.0, classes=0, eval_every=1),
    "beitv2_large_ft21kto1k": dict(lr=7e-5, epochs=20, warmup=5, ld=0.8, dp=0.25, bs=64, accum=2, gpus=8,
                                   mixup=0.0, cutmix=0.0, classes=0, eval_every=1),
    # the ImageNet-21k command (2 nodes x 16 GPUs, --disable_eval_during_finetuning); drop path 0.2 for large
    "beitv2_base_ft21k_pt1600e": dict(lr=6e-4, epochs=90, warmup=20, ld=0.75, dp=0.1, bs=128, accum=1, gpus=32,
                                      mixup=0.8, cutmix=1.0, classes=21841, eval_every=0),
    "beitv2_large_ft21k_pt1600e": dict(lr=6e-4, epochs=90, warmup=20, ld=0.75, dp=0.2, bs=128, accum=1, gpus=32,
                                       mixup=0.8, cutmix=1.0, classes=21841, eval_every=0),
}
# effective batch sizes the document states for its command lines
OFFICIAL_TOTAL_BATCH = {"base_1k": 1024, "large_1k": 1024, "21k": 4096}


def image_folder(root: Path) -> Path:
    from PIL import Image

    (root / "class_a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "class_a" / "0.png")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """A checkpoint path and an image folder: validation checks that the file exists and the folder holds images."""
    tmp = tmp_path_factory.mktemp("recipe")
    (tmp / "ckpt.pth").write_bytes(b"\0")
    image_folder(tmp / "train")
    return ["--model.checkpoint", str(tmp / "ckpt.pth"), "--data.path", str(tmp / "train")]


def printed_config(name: str, inputs: list[str], capsys) -> dict:
    from beitv2.cli import main

    capsys.readouterr()
    rc = main(["finetune", "--preset", name, *inputs, "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return yaml.safe_load(out)


def test_every_imagenet_finetuning_preset_is_covered():
    from beitv2.commands._training import list_recipes

    shipped = {n for n in list_recipes() if n.startswith(("beitv2_base_ft", "beitv2_large_ft"))}
    assert shipped == set(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_finetuning_preset_matches_the_official_recipe(name, inputs, capsys):
    c = printed_config(name, inputs, capsys)
    o = OFFICIAL[name]
    m, a, opt, t = c["model"], c["aug"], c["optim"], c["train"]
    assert (opt["lr"], t["epochs"], opt["warmup_epochs"], opt["layer_decay"], m["drop_path"]) == \
        (o["lr"], o["epochs"], o["warmup"], o["ld"], o["dp"])
    assert (t["batch_size"], t["accum_steps"], a["mixup"], a["cutmix"]) == \
        (o["bs"], o["accum"], o["mixup"], o["cutmix"])
    assert (m["num_classes"], t["eval_every_epochs"], m["img_size"]) == (o["classes"], o["eval_every"], [224])
    scope = "21k" if o["classes"] == 21841 else ("large_1k" if "large" in name else "base_1k")
    assert o["bs"] * o["accum"] * o["gpus"] == OFFICIAL_TOTAL_BATCH[scope]
    # shared by every recipe: --weight_decay 0.05, --imagenet_default_mean_and_std, and run_class_finetuning.py's
    # defaults for what the document does not set
    assert (opt["weight_decay"], opt["min_lr"], opt["official_no_decay"], opt["warmup_steps"]) == (0.05, 1e-6, True, 0)
    assert (a["normalize"], a["smoothing"], a["rand_aug"], a["reprob"], a["remode"], a["recount"]) == \
        ("imagenet", 0.1, "rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (a["min_crop_scale"], a["interpolation"], a["crop_pct"]) == (0.08, "bicubic", 0.0)
    assert (m["head_init_scale"], m["use_cls"], m["rel_pos_bias"], m["drop_rate"], m["attn_drop_rate"]) == \
        (0.001, False, True, 0.0, 0.0)
    assert (c["ema"]["enabled"], opt["schedule"], opt["lr_reference_batch"]) == (False, "cosine", 0)
    assert t["output_dir"] == f"runs/{name}"


def test_21k_preset_through_the_installed_cli(inputs):
    """The same path a user takes: a fresh interpreter, the preset resolved from the package's configs."""
    r = subprocess.run([sys.executable, "-m", "beitv2.cli", "finetune", "--preset", "beitv2_large_ft21k_pt1600e",
                        *inputs, "--print-config"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    c = yaml.safe_load(r.stdout)
    assert (c["model"]["num_classes"], c["model"]["drop_path"], c["train"]["eval_every_epochs"]) == (21841, 0.2, 0)
    assert c["data"]["val_path"] == ""


def test_presets_are_in_the_training_docs():
    table = (ROOT / "docs" / "training.md").read_text()
    missing = [n for n in OFFICIAL if f"`{n}`" not in table]
    assert not missing


def test_21k_to_1k_preset_keeps_the_intermediate_classifier_except_its_head(tmp_path):
    """The intermediate checkpoint is a classifier (per-block tables, fc_norm, a 21841-class head, DeepSpeed's
    'module' key): the 1k recipe keeps everything but the head, which is re-initialised at scale 0.001."""
    import torch

    from beitv2.commands._training import load_recipe
    from beitv2.commands.finetune import FinetuneConfig
    from beitv2.config import build_config
    from beitv2.eval.finetune import build_finetune_model
    from beitv2.models.backbone import BEiTViT, ViTConfig

    torch.manual_seed(0)
    src = BEiTViT(ViTConfig(img_size=(32,), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7,
                            use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mean_pooling=True,
                            init_values=0.1))
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    torch.save({"module": sd}, tmp_path / "ft21k.pth")
    image_folder(tmp_path / "train")
    cfg = build_config(FinetuneConfig, recipe=load_recipe("beitv2_base_ft21kto1k"),
                       overrides={"model": {"checkpoint": str(tmp_path / "ft21k.pth"), "img_size": [32]},
                                  "data": {"path": str(tmp_path / "train")}})
    net, report = build_finetune_model(cfg.model, 4)
    got = net.state_dict()
    assert sorted(report["missing"]) == ["head.bias", "head.weight"] and not report["unexpected"]
    for k in ("fc_norm.weight", "blocks.1.attn.relative_position_bias_table", "blocks.0.gamma_1"):
        assert torch.equal(got[k], sd[k]), k
    assert got["head.weight"].shape == (4, 32) and got["head.weight"].abs().max() < 1e-3
    assert net.config.drop_path_rate == 0.1 and net.config.use_mean_pooling
