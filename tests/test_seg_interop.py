"""Segmenter <-> transformers `BeitForSemanticSegmentation` at trained-scale weights: which blocks each side taps,
import of a folder in the published ADE20K layout, export (refused where transformers cannot tap the same blocks),
the exported folder's preprocessor, labels and model card, and transformers' segmentation pipeline on a PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import tiny_segmenter
from PIL import Image

from beitv2.checkpoint import save_model
from beitv2.models.segmenter import Segmenter, SegmenterConfig

NAMES = ["sky", "road", "tree", "car", "person"]


def _trained_scale_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init: layer-scale gammas 1, classifiers N(0, 1), the other head / pyramid convs N(0, 1 / fan_in)
    (activations keep their scale through the stack), random relative position tables, BatchNorm affine parameters
    and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma_1", "gamma_2", "lambda_1", "lambda_2"):
                p.fill_(1.0)
            elif "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif not name.startswith(("backbone.", "beit.")) and p.dim() > 1:
                fan_in = p.shape[1] * p[0, 0].numel() if "fpn" not in name else p.shape[0] * p[0, 0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / (1.0 if "classifier" in name else fan_in ** 0.5))
            elif not name.startswith(("backbone.", "beit.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if leaf == "weight" else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.25)


def _hf_logits(hf, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own forward: its logits, and its auxiliary head's output as that forward computes it."""
    seen = {}
    handle = hf.auxiliary_head.register_forward_hook(lambda mod, inp, out: seen.setdefault("aux", out))
    try:
        with torch.no_grad():
            logits = hf(pixel_values=x).logits
    finally:
        handle.remove()
    return logits, seen["aux"]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    assert scale > 5  # trained scale: logits far from the near-zero outputs of an initialised head
    torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=0)


def _published_layout(tmp_path: Path, out_indices: list[int]) -> Path:
    """A tiny folder with the structure of transformers' ADE20K BEiT checkpoints: per-block relative position tables,
    no absolute positions, out_indices short of the last block, an FCN auxiliary head, LayerNorm eps 1e-12."""
    from transformers import BeitConfig, BeitForSemanticSegmentation

    torch.manual_seed(1)
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=64, use_relative_position_bias=True, use_absolute_position_embeddings=False,
                        use_mean_pooling=True, layer_scale_init_value=0.1, out_indices=out_indices,
                        use_auxiliary_head=True, auxiliary_channels=8, num_labels=5, pool_scales=[1, 2, 3, 6],
                        id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    hf = BeitForSemanticSegmentation(config)
    _trained_scale_(hf)
    with torch.no_grad():
        for n, p in hf.beit.named_parameters():
            if "relative_position_bias_table" not in n and "lambda" not in n and p.dim() > 1:
                p.mul_(5.0)  # backbone weights well above their 0.02 init
    hf.save_pretrained(str(tmp_path / "published"))
    return tmp_path / "published"


@pytest.mark.parametrize("hf_indices, blocks", [([2, 3, 4, 5], (1, 2, 3, 4)),  # the published pattern, scaled down
                                                ([1, 3, 5, 6], (0, 2, 4, 5))])  # out_index 1: the patch embedding
def test_import_published_layout_gives_transformers_logits(tmp_path, hf_indices, blocks):
    from transformers import BeitForSemanticSegmentation

    from beitv2.interop.hf_segmentation import import_hf_segmentation

    folder = _published_layout(tmp_path, hf_indices)
    ours, names = import_hf_segmentation(folder)
    hf = BeitForSemanticSegmentation.from_pretrained(str(folder)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits, aux = _hf_logits(hf, x)
    with torch.no_grad():
        mine, mine_aux = ours(x, return_aux=True)
    _close(mine, logits)
    _close(mine_aux, aux)
    assert ours.config.indices == blocks and names == NAMES
    # the same weights tapping the blocks named by transformers' indices taken as block numbers (the reading before
    # the conventions were told apart) give other logits: the comparison above can tell the two readings apart
    shifted = [min(i, 6) for i in hf_indices]
    wrong = Segmenter(SegmenterConfig(**{**ours.config.__dict__, "out_indices": tuple(shifted)})).eval()
    wrong.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (wrong(x) - logits).abs().max() > 100 * 1e-4 * logits.abs().max()


def _ours(out_indices: tuple[int, ...], depth: int = 4) -> Segmenter:
    m = tiny_segmenter(seed=0, vit={"depth": depth}, out_indices=out_indices)
    _trained_scale_(m)
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            if "relative_position_bias_table" not in n and p.dim() > 1:
                p.mul_(5.0)
    return m.eval()


def _convert(src: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "beitv2", "convert", "--from", "beitv2", "--to", "hf", str(src),
                           str(out)], capture_output=True, text=True, timeout=300, env=env)


def test_export_gives_our_logits_with_labels_preprocessor_and_card(tmp_path):
    from transformers import BeitForSemanticSegmentation

    from beitv2.interop.hf_segmentation import import_hf_segmentation

    m = _ours((0, 1, 2, 3))  # transformers out_indices 1 2 3 4
    path = save_model(tmp_path / "run" / "model.safetensors", m, "segmenter", extra={
        "class_names": json.dumps(NAMES), "normalize": "clip", "reduce_zero_label": "true"})
    r = _convert(path, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    hf = BeitForSemanticSegmentation.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, aux = _hf_logits(hf, x)
    with torch.no_grad():
        mine, mine_aux = m(x, return_aux=True)
    _close(logits, mine)
    _close(aux, mine_aux)
    assert list(hf.config.out_indices) == [1, 2, 3, 4]
    assert hf.config.id2label == dict(enumerate(NAMES)) and hf.config.label2id["car"] == 3
    proc = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": 32, "width": 32} and proc["do_reduce_labels"] is True
    assert proc["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP statistics, as recorded
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "car" in card and "[0, 1, 2, 3]" in card
    back, names = import_hf_segmentation(tmp_path / "hf")
    assert names == NAMES and back.config.indices == (0, 1, 2, 3)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_of_official_taps_is_refused_in_one_line(tmp_path):
    m = _ours(())  # official layout: the last tap is the last block (1 2 3 4 for depth 4)
    assert m.config.indices[-1] == 4
    path = save_model(tmp_path / "model.safetensors", m, "segmenter")
    r = _convert(path, tmp_path / "hf")
    assert r.returncode == 2 and not (tmp_path / "hf").exists()
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "cannot read the last block (4)" in err and "--model.out_indices 0 1 2 3" in err


def test_pipeline_on_a_png_returns_the_classes(tmp_path):
    from transformers import AutoImageProcessor, pipeline

    from beitv2.interop.hf_segmentation import export_hf_segmentation

    m = _ours((1, 2, 2, 3))
    with pytest.raises(ValueError, match="four different blocks"):
        export_hf_segmentation(m, tmp_path / "dup")
    m = _ours((0, 1, 2, 3))
    folder = export_hf_segmentation(m, tmp_path / "hf", NAMES, normalize="imagenet")
    rng = np.random.default_rng(0)
    png = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(png)
    regions = pipeline("image-segmentation", model=str(folder))(str(png))
    labels = [r["label"] for r in regions]
    assert labels and set(labels) <= set(NAMES) and len(set(labels)) == len(labels)
    masks = np.stack([np.asarray(r["mask"]) > 0 for r in regions])
    assert masks.shape[1:] == (45, 60) and (masks.sum(0) == 1).all()  # every pixel in exactly one class
    # the classes are our segmenter's argmax on the same input (the processor's resize and normalisation)
    pixels = AutoImageProcessor.from_pretrained(str(folder))(Image.open(png), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        up = torch.nn.functional.interpolate(m(pixels), size=(45, 60), mode="bilinear", align_corners=False)
    pred = up.argmax(1)[0].numpy()
    assert sorted(labels) == sorted(NAMES[c] for c in np.unique(pred))
    for r in regions:
        np.testing.assert_array_equal(np.asarray(r["mask"]) > 0, pred == NAMES.index(r["label"]))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pipeline_on_a_one_channel_segmenter_reads_the_luma(tmp_path, mode):
    """transformers' pipeline converts every image to RGB: a 1-channel segmenter's export takes RGB and reads its
    luma, so a grayscale PNG gets exactly our segmenter's classes and an RGB one those of its luma."""
    from transformers import AutoImageProcessor, pipeline

    from beitv2.interop.hf_segmentation import export_hf_segmentation
    from beitv2.utils.imaging import LUMA

    m = tiny_segmenter(seed=0, vit={"in_chans": 1}, out_indices=(0, 1, 2, 3))
    _trained_scale_(m)
    m.eval()
    folder = export_hf_segmentation(m, tmp_path / "hf", NAMES, normalize="inception")
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    shape = (40, 52) if mode == "L" else (40, 52, 3)
    png = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8), mode).save(png)
    regions = pipeline("image-segmentation", model=str(folder))(str(png))
    rgb = AutoImageProcessor.from_pretrained(str(folder))(Image.open(png), return_tensors="pt")["pixel_values"]
    gray = sum(w * rgb[:, c:c + 1] for c, w in enumerate(LUMA))  # the same mean / std on every channel
    if mode == "L":
        torch.testing.assert_close(gray, rgb[:, :1], atol=1e-5, rtol=0)
    with torch.no_grad():
        up = torch.nn.functional.interpolate(m(gray), size=(40, 52), mode="bilinear", align_corners=False)
    pred = up.argmax(1)[0].numpy()
    assert sorted(r["label"] for r in regions) == sorted(NAMES[c] for c in np.unique(pred))
    for r in regions:
        np.testing.assert_array_equal(np.asarray(r["mask"]) > 0, pred == NAMES.index(r["label"]))


def test_processor_pixels_are_the_images_normalised_as_in_training(tmp_path):
    """The exported processor rescales by 1/255 and normalises with the recorded statistics: on an image already at
    the model's size (no resampling) its pixels are ((x / 255) - mean) / std exactly."""
    from transformers import AutoImageProcessor

    from beitv2.interop.hf_segmentation import export_hf_segmentation

    folder = export_hf_segmentation(_ours((0, 1, 2, 3)), tmp_path / "hf", NAMES, normalize="imagenet")
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels = AutoImageProcessor.from_pretrained(str(folder))(Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(pixels.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("n", [40, 41])
def test_model_card_lists_up_to_forty_classes(n):
    from beitv2.interop.hf_segmentation import _model_card, hf_segmentation_config

    m = tiny_segmenter(seed=0, num_classes=n, out_indices=(0, 1, 2, 3))
    names = [f"class{i}" for i in range(n)]
    card = _model_card(hf_segmentation_config(m.config, names), names, "imagenet", False, m.config)
    assert ("class39" in card) and (("class40" in card) is False)
    assert (f"... ({n} in all)" in card) == (n > 40)


def test_head_classifiers_start_at_the_official_init():
    """The decode and auxiliary classifiers: weights N(0, 0.01), biases 0 (mmseg's init of conv_seg)."""
    m = tiny_segmenter(seed=0, num_classes=150, out_indices=(0, 1, 2, 3))
    for head in (m.decode_head, m.auxiliary_head):
        assert torch.equal(head.classifier.bias, torch.zeros_like(head.classifier.bias))
        assert abs(float(head.classifier.weight.detach().std()) - 0.01) < 0.002
