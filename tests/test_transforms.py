"""The two-view augmentation (one shared draw), normalisation, and the evaluation / tokenizer views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beitv2.data import EvalTransform, RandomErasing, TokenizerTrainTransform, TwoViewTransform, resolve_norm
from beitv2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def seen(tf, img):
    """What the model sees: the transform's uint8 views converted by their specs (on the device, in training)."""
    out = tf(img)
    views = out if isinstance(out, tuple) else (out,)
    assert all(v.dtype == torch.uint8 for v in views)
    floats = tuple(spec(v) for spec, v in zip(tf.specs, views))
    return floats if isinstance(out, tuple) else floats[0]


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
        v1, v2 = seen(tf, img)
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
    v1, v2 = seen(tf, _half_black_white())
    for v in (v1, v2):
        assert (v[:, :, 0].mean() > 0.5) == left_white and (v[:, :, -1].mean() > 0.5) != left_white


def test_normalisation_of_view1_only():
    gray = Image.new("RGB", (40, 40), (128, 64, 32))
    rgb01 = torch.tensor([128, 64, 32]) / 255.0
    for norm, (mean, std) in {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                              "inception": ((0.5,) * 3, (0.5,) * 3),
                              ((0.1, 0.2, 0.3), (0.2, 0.2, 0.4)): ((0.1, 0.2, 0.3), (0.2, 0.2, 0.4))}.items():
        v1, v2 = seen(TwoViewTransform(24, 12, normalize=norm, color_jitter=0.0), gray)
        expect = (rgb01 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(v1.mean(dim=(1, 2)), expect, atol=1e-5), norm
        assert torch.allclose(v2.mean(dim=(1, 2)), rgb01, atol=1e-6)  # tokenizer view stays in [0, 1]
    v1, _ = seen(TwoViewTransform(24, 12, normalize="none", color_jitter=0.0), gray)
    assert torch.allclose(v1.mean(dim=(1, 2)), rgb01, atol=1e-6)


def test_color_jitter_is_shared_by_both_views():
    tf = TwoViewTransform(24, 12, normalize="imagenet", color_jitter=0.4)
    img = Image.new("RGB", (30, 30), (120, 90, 60))
    torch.manual_seed(0)
    v1, v2 = seen(tf, img)
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
    v1, v2 = seen(TwoViewTransform(16, 8, normalize=((0.1,), (0.5,)), channels=1, color_jitter=0.4), img)
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
    x = seen(ev, img)
    assert x.shape == (3, 24, 24) and x.min() < 0  # ImageNet-normalised
    x01 = seen(EvalTransform(24, normalize="none"), img)
    assert x01.shape == (3, 24, 24) and 0 <= x01.min() and x01.max() <= 1
    centre = np.asarray(img.resize((36, 27), Image.BICUBIC))[2:26, 6:30] / 255.0  # top = round(1.5) = 2
    assert np.allclose(x01.permute(1, 2, 0).numpy(), centre, atol=1.5 / 255)
    t = seen(TokenizerTrainTransform(16), img)
    assert t.shape == (3, 16, 16) and 0 <= t.min() and t.max() <= 1


# ------------------------------------------------------------------------------- uint8 views, converted on the device

def _photo(w=120, h=90, seed=0, mode="RGB") -> Image.Image:
    """Smooth colour gradients plus noise: resizing and jitter have something to round."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 90 + 128
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    return img.convert(mode)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _both_paths(make, img, seed):
    """(uint8 path converted by its specs on each device, float path) of one draw."""
    tf_u8, tf_f = make("uint8"), make("float")
    assert all(s is None for s in tf_f.specs) and all(s is not None for s in tf_u8.specs)
    torch.manual_seed(seed)
    u8 = tf_u8(img)
    torch.manual_seed(seed)
    ref = tf_f(img)
    u8, ref = (u8, ref) if isinstance(u8, tuple) else ((u8,), (ref,))
    return {dev: tuple(s(v.to(dev)).cpu() for s, v in zip(tf_u8.specs, u8)) for dev in _devices()}, ref


@pytest.mark.parametrize("case", ["same_size", "second_112_lanczos", "gray", "jitter_before_crop", "tokenizer",
                                  "eval_imagenet", "eval_none"])
def test_uint8_views_converted_on_the_device_equal_the_float_path_bitwise(case):
    """Resize, flip and jitter run on the 8-bit PIL image in both paths, and the device conversion repeats
    torchvision's ToDtype + Normalize float32 ops in order, so every value is identical, not just close."""
    two = {"same_size": dict(input_size=48, second_input_size=48),
           "second_112_lanczos": dict(input_size=48, second_input_size=24, second_interpolation="lanczos"),
           "gray": dict(input_size=32, second_input_size=16, channels=1, normalize="inception"),
           "jitter_before_crop": dict(input_size=48, second_input_size=32, jitter_after_crop=False, normalize="clip")}
    if case in two:
        def make(output):
            return TwoViewTransform(min_crop_scale=0.2, color_jitter=0.4, output=output, **two[case])
    elif case == "tokenizer":
        def make(output):
            return TokenizerTrainTransform(40, color_jitter=0.4, output=output)
    else:
        def make(output):
            return EvalTransform(32, normalize="imagenet" if case == "eval_imagenet" else "none", output=output)
    img = _photo(mode="L" if case == "gray" else "RGB")
    for seed in range(5):
        got, ref = _both_paths(make, img, seed)
        for dev, views in got.items():
            for v, r in zip(views, ref):
                assert v.dtype == r.dtype == torch.float32 and v.shape == r.shape
                assert torch.equal(v, r), (case, seed, dev, (v - r).abs().max())


def test_a_batch_converted_at_once_equals_per_sample_conversion():
    from beitv2.data import prepare_batch

    tf = TwoViewTransform(32, 16, color_jitter=0.4, normalize="imagenet")
    imgs = [_photo(seed=s) for s in range(4)]
    torch.manual_seed(0)
    views = [tf(im) for im in imgs]
    batch = {"image": torch.stack([v[0] for v in views]), "tokenizer_image": torch.stack([v[1] for v in views]),
             "label": torch.arange(4)}
    spec = {"image": tf.specs[0], "tokenizer_image": tf.specs[1]}
    out = prepare_batch(batch, spec)
    assert torch.equal(out["label"], batch["label"]) and batch["image"].dtype == torch.uint8  # input left as it was
    for i, (v1, v2) in enumerate(views):
        assert torch.equal(out["image"][i], tf.specs[0](v1)) and torch.equal(out["tokenizer_image"][i], tf.specs[1](v2))
    with pytest.raises(TypeError, match="uint8"):
        prepare_batch({"image": out["image"]}, spec)  # converting twice is a bug, not a no-op


def test_jitter_after_the_crop_draws_the_same_and_differs_only_by_the_crop_statistics():
    """Both orders draw the same factors, flip and crop. Jittering the whole image at its own size (crop = image,
    no resize) is then exactly jittering after; with a real crop and resize, brightness and saturation (per pixel)
    differ only where rounding and clipping meet the resize, while contrast blends towards the crop's mean grey
    instead of the whole image's."""
    from torchvision.transforms import v2

    img = _photo()

    def views(after, jitter=None, **kw):
        tf = TwoViewTransform(color_jitter=0.4, normalize="none", jitter_after_crop=after, **kw)
        if jitter is not None:
            tf.jitter = jitter
        return tf

    jitter = views(False).jitter
    torch.manual_seed(0)
    called = jitter(img)  # the transform as a whole, as the official order applies it
    torch.manual_seed(0)
    assert np.array_equal(np.asarray(jitter.transform(img, jitter.make_params([img]))), np.asarray(called))
    whole = dict(input_size=(90, 120), second_input_size=(90, 120), min_crop_scale=1.0, ratio=(4 / 3, 4 / 3))
    for seed in range(5):
        torch.manual_seed(seed)
        a = views(True, **whole)(img)
        torch.manual_seed(seed)
        b = views(False, **whole)(img)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.manual_seed(seed)
        plain = TwoViewTransform(color_jitter=0.0, normalize="none", **whole)(img)[0]
        assert not torch.equal(a[0], plain)  # the jitter did change the image
    for jitter, mean_bound in ((v2.ColorJitter(0.4, 0, 0.4), 1.5), (None, 6.0)):
        diffs = []
        for seed in range(20):
            torch.manual_seed(seed)
            a = views(True, jitter, input_size=32, second_input_size=32)(img)[0].int()
            torch.manual_seed(seed)
            b = views(False, jitter, input_size=32, second_input_size=32)(img)[0].int()
            diffs.append((a - b).abs().float().mean().item())
        assert 0 < np.mean(diffs) < mean_bound, (jitter, np.mean(diffs))


def test_finetune_view_is_uint8_with_and_without_random_erasing():
    """timm's ToTensor divides by 255 where ImageSpec multiplies by 1/255: the same image to one float32 ulp before
    normalisation. RandomErasing runs on the device after normalising, so the view stays uint8 with it too."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms

    from beitv2.commands.finetune import FinetuneAugConfig, train_transform
    from beitv2.data.samples import seeded_rngs

    img = _photo()
    tf = train_transform(FinetuneAugConfig(reprob=0.0), (32, 32), 3, "imagenet")
    (spec,) = tf.specs
    assert spec is not None and spec.norm == resolve_norm("imagenet")
    ref_tf = train_transform(FinetuneAugConfig(reprob=0.0), (32, 32), 3, "imagenet")
    ref_tf.transforms[-1] = transforms.Compose([MaybeToTensor(), transforms.Normalize(*spec.norm)])  # timm's float end
    # x / 255 and x * (1 / 255) differ by at most 2^-24 (one float32 ulp below 1); normalised, that is 2^-24 / std,
    # plus one rounding of the result (|result| < 4: at most 2^-22)
    bound = 2.0 ** -24 / min(spec.norm[1]) + 2.0 ** -22
    for seed in range(4):
        with seeded_rngs(seed):
            u8 = tf(img)
        with seeded_rngs(seed):
            ref = ref_tf(img)
        assert u8.dtype == torch.uint8
        diff = (spec(u8) - ref).abs().max().item()
        assert diff <= bound, diff
    erasing = train_transform(FinetuneAugConfig(reprob=0.25), (32, 32), 3, "imagenet")
    (espec,) = erasing.specs
    assert espec.erasing == RandomErasing(0.25, "pixel", 1) and espec.norm == spec.norm
    assert erasing(img).dtype == torch.uint8


def _erased(out: torch.Tensor) -> torch.Tensor:
    """[B] erased pixel counts of a batch of ones erased with zeros (mode const)."""
    return (out[:, 0] == 0).flatten(1).sum(1)


@pytest.mark.parametrize("max_count", [1, 3])
def test_device_random_erasing_matches_timms_distribution(max_count):
    """The vectorised erasing draws what timm's per-image RandomErasing draws: the share of images erased, the
    erased area's mean and spread, the rectangles' aspect ratios (max_count 1), and one rectangle per draw."""
    import random

    from timm.data.random_erasing import RandomErasing as TimmErasing

    b, h, w = 4000, 24, 32
    ones = torch.ones(b, 2, h, w)
    torch.manual_seed(0)
    half = (_erased(RandomErasing(0.5, "const", max_count)(ones.clone())) > 0).float().mean()
    assert abs(half - 0.5) < 0.04  # std 0.008
    ours = RandomErasing(1.0, "const", max_count)(ones.clone())
    random.seed(0)
    ref = TimmErasing(1.0, mode="const", max_count=max_count, device="cpu")(ones.clone())
    a, r = _erased(ours).float(), _erased(ref).float()
    # about 130 of 768 pixels with a spread of about 75: the means' standard error is about 1.2 each
    assert abs(a.mean() - r.mean()) < 0.05 * r.mean(), (a.mean(), r.mean())
    assert abs(a.std() - r.std()) < 0.1 * r.std(), (a.std(), r.std())
    assert torch.equal(ours[:, 0] == 0, ours[:, 1] == 0)  # every channel of a rectangle
    if max_count == 1:
        aspects = []
        for m in (ours[:, 0] == 0)[:200]:
            if m.any():
                ys, xs = m.nonzero(as_tuple=True)
                hh, ww = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
                assert hh * ww == m.sum()  # a filled rectangle
                aspects.append(float(hh / ww))
        log_aspect = torch.tensor(aspects).log()
        assert abs(log_aspect.mean()) < 0.2 and 0.45 < log_aspect.std() < 0.9  # U(log .3, log 3.3): std 0.70


def test_device_random_erasing_noise_is_normalised_space_and_seeded():
    """pixel mode fills with N(0, 1) per pixel, rand mode one N(0, 1) value per channel; the same torch seed draws
    the same batch (resume draws from the checkpointed generator), and nothing is erased at probability 0."""
    x = torch.full((400, 3, 16, 16), 7.0)
    torch.manual_seed(1)
    a = RandomErasing(1.0, "pixel")(x.clone())
    torch.manual_seed(1)
    assert torch.equal(a, RandomErasing(1.0, "pixel")(x.clone()))
    noise = a[a != 7.0]
    assert noise.numel() > 400 * 3 * 5 and abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    per_channel = RandomErasing(1.0, "rand")(x.clone())
    for img in per_channel[:20]:
        for ch in img:
            vals = ch[ch != 7.0].unique()
            assert vals.numel() == 1
    assert torch.equal(RandomErasing(0.0, "pixel")(x.clone()), x)
    with pytest.raises(ValueError, match="mode"):
        RandomErasing(0.5, "noise")
