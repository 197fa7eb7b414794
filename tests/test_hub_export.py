"""Export completeness and the hub: HF folders that AutoImageProcessor and pipeline() read, timm label names,
hf-hub:ORG/NAME checkpoints through huggingface_hub's cache (offline, populated here; no network)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from _helpers import populate_hf_cache
from PIL import Image

from beitv2.checkpoint import save_model
from beitv2.cli import main
from beitv2.models.presets import build_model

NAMES = ["cat", "dog", "bird"]
ROOT = Path(__file__).resolve().parents[1]


def _classifier(tmp_path):
    torch.manual_seed(0)
    vit = build_model("vit_tiny", num_classes=3, depth=2)
    path = save_model(tmp_path / "ft.safetensors", vit, extra={"class_names": json.dumps(NAMES),
                                                                "normalize": "imagenet"})
    return vit.eval(), path


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
        assert torch.allclose(hf(pixel_values=pixels).logits, vit(pixels), atol=1e-4)
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
    assert torch.allclose(torch.load(tmp_path / "y.pt"), vit(x), atol=1e-6)
    # the command line takes hf-hub: too; a repo missing from the offline cache is a one-line error
    r = subprocess.run([sys.executable, "-m", "beitv2", "convert", "--from", "beitv2", "--to", "timm",
                        "hf-hub:someorg/tiny-vit", str(tmp_path / "t")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and (tmp_path / "t" / "model.safetensors").is_file(), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "beitv2", "knn", "--model.checkpoint", "hf-hub:someorg/missing",
                        "--data.kind", "fmnist"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "model.checkpoint" in r.stderr and "Traceback" not in r.stderr
