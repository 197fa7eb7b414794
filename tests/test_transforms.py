"""The two-view augmentation (one shared draw), normalisation, and the evaluation / tokenizer views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beitv2.data import EvalTransform, TokenizerTrainTransform, TwoViewTransform, resolve_norm
from beitv2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _half_black_white(w=64, h=48) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, w // 2:] = 255
    return Image.fromarray(arr)


def _edge(view: torch.Tensor) -> float:
    """Fraction of the width that is dark: where the black/white edge sits in the view."""
    cols = view.mean(dim=(0, 1))
    return float((cols < 0.5).float().mean())


def test_both_views_come_from_the_same_crop():
    tf = TwoViewTransform(input_size=32, second_input_size=16, min_crop_scale=0.1, color_jitter=0.0,
                          normalize="none")
    img = _half_black_white()
    edges = []
    for seed in range(30):
        torch.manual_seed(seed)
        v1, v2 = tf(img)
        assert v1.shape == (3, 32, 32) and v2.shape == (3, 16, 16)
        assert abs(_edge(v1) - _edge(v2)) <= 1 / 16 + 1e-6, seed
        # same column profile, so the same orientation too (a flip applies to both views)
        prof1 = v1.mean(dim=(0, 1)).view(16, 2).mean(dim=1)
        prof2 = v2.mean(dim=(0, 1))
        assert (prof1 - prof2).abs().mean() < 0.08, seed
        edges.append(_edge(v1))
    assert len({round(e, 2) for e in edges}) > 5  # the crop does vary between draws
    assert any(e in (0.0, 1.0) for e in edges) or min(edges) < 0.5 < max(edges)


@pytest.mark.parametrize("flip, left_white", [(0.0, False), (1.0, True)])
def test_flip_applies_to_both_views(flip, left_white):
    tf = TwoViewTransform(input_size=16, second_input_size=8, min_crop_scale=1.0, color_jitter=0.0, hflip=flip,
                          normalize="none")
    tf.crop.ratio = (64 / 48, 64 / 48)  # the whole image
    v1, v2 = tf(_half_black_white())
    for v in (v1, v2):
        assert (v[:, :, 0].mean() > 0.5) == left_white and (v[:, :, -1].mean() > 0.5) != left_white


def test_normalisation_of_view1_only():
    gray = Image.new("RGB", (40, 40), (128, 64, 32))
    rgb01 = torch.tensor([128, 64, 32]) / 255.0
    for norm, (mean, std) in {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                              "inception": ((0.5,) * 3, (0.5,) * 3),
                              ((0.1, 0.2, 0.3), (0.2, 0.2, 0.4)): ((0.1, 0.2, 0.3), (0.2, 0.2, 0.4))}.items():
        v1, v2 = TwoViewTransform(24, 12, normalize=norm, color_jitter=0.0)(gray)
        expect = (rgb01 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(v1.mean(dim=(1, 2)), expect, atol=1e-5), norm
        assert torch.allclose(v2.mean(dim=(1, 2)), rgb01, atol=1e-6)  # tokenizer view stays in [0, 1]
    v1, _ = TwoViewTransform(24, 12, normalize="none", color_jitter=0.0)(gray)
    assert torch.allclose(v1.mean(dim=(1, 2)), rgb01, atol=1e-6)


def test_color_jitter_is_shared_by_both_views():
    tf = TwoViewTransform(24, 12, normalize="imagenet", color_jitter=0.4)
    img = Image.new("RGB", (30, 30), (120, 90, 60))
    torch.manual_seed(0)
    v1, v2 = tf(img)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    un = v1.mean(dim=(1, 2)) * std + mean
    assert torch.allclose(un, v2.mean(dim=(1, 2)), atol=1e-5)
    assert not torch.allclose(v2.mean(dim=(1, 2)), torch.tensor([120, 90, 60]) / 255.0, atol=1e-3)


def test_grayscale_views_and_stats():
    assert resolve_norm("imagenet", 1) == ((sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,))
    assert resolve_norm("none", 1) is None
    with pytest.raises(ValueError, match="3 values"):
        resolve_norm(((0.5,), (0.5,)), 3)
    with pytest.raises(ValueError, match="one of"):
        resolve_norm("nope")
    img = Image.new("L", (20, 20), 51)
    v1, v2 = TwoViewTransform(16, 8, normalize=((0.1,), (0.5,)), channels=1, color_jitter=0.4)(img)
    assert v1.shape == (1, 16, 16) and v2.shape == (1, 8, 8)
    assert torch.allclose(v1, (v2.mean() - 0.1) / 0.5, atol=1e-5)


def test_second_interpolation_options():
    img = _half_black_white()
    for interp in ("bicubic", "lanczos", "bilinear"):
        tf = TwoViewTransform(16, 8, second_interpolation=interp, color_jitter=0.0, normalize="none")
        assert tf(img)[1].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="interpolation"):
        TwoViewTransform(16, 8, second_interpolation="cubic")
    with pytest.raises(ValueError, match="min_crop_scale"):
        TwoViewTransform(16, 8, min_crop_scale=0.0)


def test_eval_and_tokenizer_views():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    ev = EvalTransform(24)
    assert ev.resize_size == 27  # 24 / 0.875, the 256-for-224 rule
    x = ev(img)
    assert x.shape == (3, 24, 24) and x.min() < 0  # ImageNet-normalised
    x01 = EvalTransform(24, normalize="none")(img)
    assert x01.shape == (3, 24, 24) and 0 <= x01.min() and x01.max() <= 1
    centre = np.asarray(img.resize((36, 27), Image.BICUBIC))[2:26, 6:30] / 255.0  # top = round(1.5) = 2
    assert np.allclose(x01.permute(1, 2, 0).numpy(), centre, atol=1.5 / 255)
    t = TokenizerTrainTransform(16)(img)
    assert t.shape == (3, 16, 16) and 0 <= t.min() and t.max() <= 1
