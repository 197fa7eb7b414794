"""Export completeness and the hub: HF folders that AutoImageProcessor and pipeline() read, timm folders whose
``pretrained_cfg`` gives the model's own preprocessing, on real image files, for 1- and 3-channel models; timm label
names; hf-hub:ORG/NAME checkpoints through huggingface_hub's cache (offline, populated here; no network)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import populate_hf_cache
from PIL import Image

from beitv2.checkpoint import save_model
from beitv2.cli import main
from beitv2.data.images import load_image
from beitv2.data.transforms import EvalTransform
from beitv2.models.architectures import build_model

NAMES = ["cat", "dog", "bird"]
ROOT = Path(__file__).resolve().parents[1]


def trained_scale(vit):
    """Weights far from init: layer-scale gammas around 1, a N(0, 1) head, LayerNorm affines away from (1, 0)."""
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if "gamma" in n:
                p.normal_(1.0, 0.2)
            elif n.startswith("head."):
                p.normal_(0.0, 1.0)
            elif "norm" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.3)
    return vit.eval()


def _classifier(tmp_path):
    torch.manual_seed(0)
    vit = trained_scale(build_model("vit_tiny", num_classes=3, depth=2))
    path = save_model(tmp_path / "ft.safetensors", vit, extra={"class_names": json.dumps(NAMES),
                                                                "normalize": "imagenet"})
    return vit, path


def test_hf_export_works_with_auto_image_processor_and_pipeline(tmp_path):
    from transformers import AutoImageProcessor, BeitForImageClassification, pipeline

    vit, path = _classifier(tmp_path)
    out = tmp_path / "hf"
    assert main(["convert", "--from", "beitv2", "--to", "hf", str(path), str(out)]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert "library_name: transformers" in (out / "README.md").read_text()
    proc = AutoImageProcessor.from_pretrained(out)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pixels = proc(img, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28)
    hf = BeitForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label == dict(enumerate(NAMES))
    with torch.no_grad():
        ours = vit(pixels)
        assert (hf(pixel_values=pixels).logits - ours).abs().max() <= 1e-4 * ours.abs().max()
    preds = pipeline("image-classification", model=str(out))(img, top_k=3)
    assert sorted(p["label"] for p in preds) == sorted(NAMES)


def test_timm_export_carries_label_names(tmp_path):
    _, path = _classifier(tmp_path)
    out = tmp_path / "timm"
    assert main(["convert", "--from", "beitv2", "--to", "timm", str(path), str(out)]) == 0
    import timm

    assert json.loads((out / "config.json").read_text())["label_names"] == NAMES
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["label_names"] == NAMES


def test_hub_folder_round_trips_through_hf_hub_offline(tmp_path):
    vit, path = _classifier(tmp_path)
    folder = tmp_path / "hub"
    assert main(["convert", "--from", "beitv2", "--to", "hub", str(path), str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert json.loads((folder / "config.json").read_text())["kind"] == "vit"
    cache = tmp_path / "hf_cache"
    populate_hf_cache(cache, "someorg/tiny-vit", {p.name: p for p in folder.iterdir()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    x = torch.rand(2, 3, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, beitv2\n"
            "m = beitv2.load_model('hf-hub:someorg/tiny-vit')\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "torch.save(m(x), sys.argv[1]); print(m.kind, m.config.depth)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["vit", "2"]
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), vit(x), atol=1e-6)
    # the command line takes hf-hub: too; a repo missing from the offline cache is a one-line error
    r = subprocess.run([sys.executable, "-m", "beitv2", "convert", "--from", "beitv2", "--to", "timm",
                        "hf-hub:someorg/tiny-vit", str(tmp_path / "t")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and (tmp_path / "t" / "model.safetensors").is_file(), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "beitv2", "knn", "--model.checkpoint", "hf-hub:someorg/missing",
                        "--data.kind", "fmnist"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "model.checkpoint" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------- the model's own preprocessing, on files
def _image_files(folder: Path) -> dict[str, Path]:
    """A grayscale PNG, an RGB PNG and an RGB JPEG, larger than the model (so resize and crop both act) and of
    sizes where every crop margin is even (transformers floors an odd half-margin, torchvision rounds it)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    Image.fromarray(noise(80, 100, 1)[..., 0], "L").save(folder / "gray.png")
    Image.fromarray(noise(100, 80, 3)).save(folder / "rgb.png")
    Image.fromarray(noise(70, 90, 3)).save(folder / "rgb.jpg", quality=95)
    return {p.name: p for p in folder.iterdir()}


@pytest.mark.parametrize("chans", [1, 3])
def test_exports_feed_the_model_what_it_was_trained_on(tmp_path, chans):
    """A fine-tuned model recorded 'inception' statistics (0.5 / 0.5) and its run folder a crop of 0.75 with
    bilinear resizing. `pipeline("image-classification")` on the HF export and timm's
    ``create_transform(**resolve_data_config({}, model=m))`` on the timm export give the model's own predictions
    (our evaluation transform written out here, then the model) on real image files, for a 1- and a 3-channel model."""
    import timm
    from transformers import AutoImageProcessor, pipeline

    torch.manual_seed(1)
    vit = trained_scale(build_model("vit_tiny", num_classes=3, depth=2, in_chans=chans, img_size=(48,), patch_size=8))
    run = tmp_path / "run"
    run.mkdir()
    path = save_model(run / "model.safetensors", vit, extra={"class_names": json.dumps(NAMES),
                                                             "normalize": "inception"})
    (run / "config.yaml").write_text(yaml.safe_dump({"aug": {"normalize": "auto", "crop_pct": 0.75,
                                                             "interpolation": "bilinear", "small_image_rule": True}}))
    assert main(["convert", "--from", "beitv2", "--to", "hf", str(path), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from", "beitv2", "--to", "timm", str(path), str(tmp_path / "timm")]) == 0
    # the model's own evaluation: shorter side to round(48 / 0.75) = 64, centre crop 48, [0, 1], (x - 0.5) / 0.5
    ours_tf = EvalTransform(48, resize_size=64, interpolation_name="bilinear", normalize="inception",
                            channels=chans, output="float")
    classify = pipeline("image-classification", model=str(tmp_path / "hf"))
    proc = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    tm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    cfg = tm.pretrained_cfg
    assert list(cfg["mean"]) == [0.5] * 3 and list(cfg["std"]) == [0.5] * 3 and cfg["label_names"] == NAMES
    assert cfg["interpolation"] == "bilinear" and tuple(cfg["input_size"]) == (3, 48, 48)
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=tm))
    for name, file in _image_files(tmp_path / "images").items():
        x = ours_tf(load_image(file, chans))
        with torch.no_grad():
            ours = vit(x[None])[0]
        probs = ours.softmax(-1)
        # what each library feeds its model: the same pixels up to its own resampling (a level or two of 255)
        hf_x = proc(Image.open(file), return_tensors="pt")["pixel_values"][0]
        timm_x = timm_tf(Image.open(file).convert("RGB"))
        for theirs in (hf_x, timm_x):
            assert theirs.shape == (3, 48, 48)
            seen = theirs if chans == 3 else (theirs * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
            assert (seen - x).abs().max() < 8 / 255 / 0.5 and (seen - x).abs().mean() < 1 / 255 / 0.5, name
        preds = classify(str(file), top_k=3)
        assert preds[0]["label"] == NAMES[int(ours.argmax())], name
        for p in preds:
            # a colour image reaches a grayscale export as float luma, ours as PIL's 8-bit 'L'; on noise images
            # that moves a probability by a few hundredths where two logits nearly tie
            assert abs(p["score"] - probs[NAMES.index(p["label"])].item()) < 0.1, (name, preds, probs)
        with torch.no_grad():
            timm_probs = tm(timm_x[None])[0].softmax(-1)
        assert int(timm_probs.argmax()) == int(ours.argmax()) and (timm_probs - probs).abs().max() < 0.1, name
