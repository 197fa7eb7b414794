"""BEiT v1 tokenizer: the Gumbel-softmax discrete VAE (`beitv2.models.dvae`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from beitv2.config import ConfigError, build_config
from beitv2.models.dvae import (
    DVAE_ARCHITECTURE_FIELDS,
    DVAE_ARCHITECTURES,
    DiscreteVAE,
    DVAEConfig,
    dvae_architecture,
    dvae_dalle,
    dvae_tiny,
    kl_to_uniform,
)


def tiny_cfg(**kw) -> DVAEConfig:
    base = dict(img_size=16, in_chans=1, downsample=4, vocab_size=64, code_dim=16, hidden_dim=8,
                blocks_per_group=1, temp_anneal_steps=100, kl_warmup_steps=10)
    return DVAEConfig(**{**base, **kw})


def structured_images(n: int, size: int, chans: int, seed: int = 0) -> torch.Tensor:
    """Fashion-MNIST-like stand-ins: stripes, rectangles and discs on a dark background, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, chans, size, size)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            period = 2 + int(torch.randint(2, 5, (1,), generator=g))
            img = ((xx + yy * (i % 2)) % period < period / 2).float()
        elif kind == 1:
            a, b = sorted(torch.randint(1, size - 1, (2,), generator=g).tolist())
            c, d = sorted(torch.randint(1, size - 1, (2,), generator=g).tolist())
            img = ((yy >= a) & (yy <= b + 1) & (xx >= c) & (xx <= d + 1)).float()
        else:
            cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).float()
            img = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size / 4) ** 2).float()
        shade = 0.5 + 0.5 * torch.rand(chans, 1, 1, generator=g)
        out[i] = img * shade
    return out


@pytest.mark.parametrize(
    "size,chans,down,rec_loss,pixel_map",
    [(16, 1, 4, "mse", "symmetric"), (32, 3, 4, "l1", "dall-e"), (32, 3, 8, "logit-laplace", "dall-e"),
     (16, 3, 2, "mse", "symmetric")],
)
def test_shapes_tokens_and_decode(size, chans, down, rec_loss, pixel_map):
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg(img_size=size, in_chans=chans, downsample=down, rec_loss=rec_loss, pixel_map=pixel_map))
    g = size // down
    assert m.grid_size == (g, g) and m.img_size == size and m.channels == chans and m.vocab_size == 64
    x = torch.rand(3, chans, size, size)
    assert m.encode_logits(x).shape == (3, 64, g, g)
    codes = m.tokenize(x)
    assert codes.dtype == torch.long and codes.shape == (3, g * g)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    img = m.decode(codes)
    assert img.shape == (3, chans, size, size) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # [B, h, w] codes decode identically; reconstruct == decode(tokenize).
    torch.testing.assert_close(m.decode(codes.view(3, g, g)), img)
    torch.testing.assert_close(m.reconstruct(x), img)
    # tokens are row-major over the grid: the token at (r, c) is the argmax of the logits at (r, c).
    logits = m.encode_logits(x)
    assert int(codes[1, 1 * g + (g - 1)]) == int(logits[1, :, 1, g - 1].argmax())


def test_non_square_inputs_and_bad_inputs():
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg())
    x = torch.rand(2, 1, 16, 32)
    codes = m.tokenize(x)
    assert codes.shape == (2, 4 * 8)
    assert m.reconstruct(x).shape == (2, 1, 16, 32)
    assert m.decode(codes.view(2, 4, 8)).shape == (2, 1, 16, 32)
    with pytest.raises(ValueError, match="1, H, W"):
        m.tokenize(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of downsample 4"):
        m.tokenize(torch.rand(2, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="grid"):
        m.decode(torch.zeros(1, 15, dtype=torch.long))


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    x = structured_images(8, 16, 1)
    m = DiscreteVAE(tiny_cfg(hidden_dim=16, vocab_size=128, kl_weight=1e-3, temp_anneal_steps=40))
    m.eval()
    with torch.no_grad():
        eval_before, _ = m(x)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(50):
        loss, metrics = m(x, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["rec_loss"])
        assert math.isfinite(metrics["loss"])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    m.eval()
    with torch.no_grad():
        eval_after, metrics = m(x)
    # the hard-code (tokenize -> decode) reconstruction improved too, with more than one code in use
    assert float(eval_after) < 0.6 * float(eval_before), (float(eval_before), float(eval_after))
    assert metrics["codebook_usage"] * 128 >= 2


def test_temperature_and_kl_schedules():
    m = DiscreteVAE(tiny_cfg(temp_anneal_steps=100, kl_weight=0.5, kl_warmup_steps=10))
    assert m.temperature_at(0) == pytest.approx(1.0)
    assert m.temperature_at(100) == pytest.approx(1 / 16)
    assert m.temperature_at(10_000) == pytest.approx(1 / 16)
    assert m.temperature_at(50) == pytest.approx((1 + 1 / 16) / 2)  # cosine midpoint
    temps = [m.temperature_at(s) for s in range(0, 101, 5)]
    assert all(a > b for a, b in zip(temps, temps[1:]))
    e = DiscreteVAE(tiny_cfg(temp_schedule="exp", temp_anneal_steps=100))
    assert e.temperature_at(0) == pytest.approx(1.0) and e.temperature_at(100) == pytest.approx(1 / 16)
    assert e.temperature_at(50) == pytest.approx(0.25)  # geometric midpoint of 1 and 1/16
    c = DiscreteVAE(tiny_cfg(temp_schedule="constant", temp_start=0.5, temp_end=0.5))
    assert c.temperature_at(0) == c.temperature_at(10**6) == 0.5
    assert m.kl_weight_at(0) == 0.0 and m.kl_weight_at(5) == pytest.approx(0.25)
    assert m.kl_weight_at(10) == pytest.approx(0.5) and m.kl_weight_at(99) == pytest.approx(0.5)
    # forward reports the scheduled values; an explicit temperature overrides the schedule; no step = schedule end
    x = torch.rand(2, 1, 16, 16)
    assert m(x, step=50)[1]["temperature"] == pytest.approx(m.temperature_at(50))
    assert m(x, step=5)[1]["kl_weight"] == pytest.approx(0.25)
    assert m(x, step=50, temperature=0.3)[1]["temperature"] == pytest.approx(0.3)
    assert m(x)[1]["temperature"] == pytest.approx(1 / 16)


def test_kl_to_uniform_by_hand():
    # uniform logits -> KL 0; q = (0.7, 0.1, 0.1, 0.1) -> 0.7 ln 0.7 + 0.3 ln 0.1 + ln 4
    assert float(kl_to_uniform(torch.zeros(2, 4, 3, 3))) == pytest.approx(0.0, abs=1e-6)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits = q.log().view(1, 4, 1, 1).expand(2, 4, 2, 2)
    want = 0.7 * math.log(0.7) + 0.3 * math.log(0.1) + math.log(4)
    assert float(kl_to_uniform(logits)) == pytest.approx(want, rel=1e-5)
    assert float(kl_to_uniform(torch.tensor([[50.0, 0, 0, 0]]).view(1, 4, 1, 1))) == pytest.approx(math.log(4))
    # the model's KL metric is 0 when the encoder's last conv outputs constant logits, and the loss adds w * kl
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg(kl_weight=2.0, kl_warmup_steps=0))
    last = m.encoder.blocks[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 3.0)
    loss, metrics = m(torch.rand(2, 1, 16, 16), step=0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["rec_loss"], abs=1e-5)
    torch.nn.init.normal_(last.weight, std=1.0)
    loss, metrics = m(torch.rand(2, 1, 16, 16), step=0)
    assert metrics["kl"] > 0.1
    assert metrics["loss"] == pytest.approx(metrics["rec_loss"] + 2.0 * metrics["kl"], rel=1e-5)


def test_metrics_and_eval_mode_is_deterministic():
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg())
    x = structured_images(4, 16, 1)
    m.eval()
    with torch.no_grad():
        l1, met = m(x)
        l2, _ = m(x)
        codes = m.tokenize(x)
        # eval loss is the MSE of the hard-code decoder output against the [-1, 1] target
        manual = F.mse_loss(m.decoder(m.codebook(codes.view(4, 4, 4)).permute(0, 3, 1, 2)), x * 2 - 1)
    assert float(l1) == float(l2)
    assert met["rec_loss"] == pytest.approx(float(manual), rel=1e-5)
    assert float(l1) == pytest.approx(met["rec_loss"] + 0.01 * met["kl"], rel=1e-5)  # default kl_weight, no step
    assert met["codebook_usage"] == pytest.approx(codes.unique().numel() / 64)
    counts = torch.bincount(codes.flatten(), minlength=64).float()
    p = counts[counts > 0] / counts.sum()
    assert met["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert set(met) >= {"loss", "rec_loss", "kl", "temperature", "codebook_usage", "perplexity"}
    m.train()
    torch.manual_seed(1)
    _, ma = m(x, step=0)
    _, mb = m(x, step=0)
    assert ma["loss"] != mb["loss"]  # Gumbel noise in training


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"^tokenizer\.dvae\.img_size: 30 is not a positive multiple of downsample 4"):
        DiscreteVAE(tiny_cfg(img_size=30))
    cases = {
        "downsample": dict(downsample=6),
        "in_chans": dict(in_chans=0),
        "vocab_size": dict(vocab_size=1),
        "hidden_dim": dict(hidden_dim=10),
        "temp_end": dict(temp_end=2.0),
        "temp_start": dict(temp_start=0.0),
        "rec_loss": dict(rec_loss="ssim"),
        "pixel_map": dict(pixel_map="imagenet"),
        "logit_laplace_eps": dict(logit_laplace_eps=0.5),
        "kl_weight": dict(kl_weight=-1.0),
        "temp_schedule": dict(temp_schedule="linear"),
    }
    for field, kw in cases.items():
        with pytest.raises(ConfigError, match=rf"^x\.{field}: "):
            tiny_cfg(**kw).validate("x.")
    # through the CLI/YAML machinery the message carries the dotted path as given
    with pytest.raises(ConfigError, match=r"^img_size: "):
        build_config(DVAEConfig, overrides={"img_size": 30, "downsample": 4})
    fields = DVAE_ARCHITECTURE_FIELDS["dvae_tiny"]
    cfg = build_config(DVAEConfig, recipe=fields, overrides={"in_chans": 1, "img_size": 28})
    assert cfg.grid_size == (7, 7) and cfg.vocab_size == 512


def test_presets():
    assert set(DVAE_ARCHITECTURES) == set(DVAE_ARCHITECTURE_FIELDS) == {"dvae_tiny", "dvae_small", "dvae_dalle"}
    assert all(isinstance(f(), DVAEConfig) for f in DVAE_ARCHITECTURES.values())
    # registered with the library-wide presets
    from beitv2.models.architectures import get_architecture

    kind, cfg = get_architecture("dvae_tiny")
    assert kind == "dvae" and cfg == dvae_tiny()
    d = dvae_dalle()
    assert (d.img_size, d.downsample, d.vocab_size, d.grid_size) == (112, 8, 8192, (14, 14))
    assert d == DVAEConfig()  # the defaults are the BEiT v1 / DALL-E shape
    s = dvae_architecture("dvae_small")
    assert s.img_size % s.downsample == 0
    t = dvae_tiny(in_chans=1, img_size=28)
    m = DiscreteVAE(t)
    assert m.grid_size == (7, 7) and m.vocab_size == 512 and m.channels == 1
    assert m.tokenize(torch.rand(2, 1, 28, 28)).shape == (2, 49)
    with pytest.raises(KeyError, match="dvae_huge"):
        dvae_architecture("dvae_huge")
    with pytest.raises(ConfigError, match="img_size"):
        dvae_tiny(img_size=30)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg(img_size=32, in_chans=3))
    x = torch.rand(4, 3, 32, 32)
    path = tmp_path / "dvae.safetensors"
    save_file(m.state_dict(), str(path))
    torch.manual_seed(123)
    m2 = DiscreteVAE(tiny_cfg(img_size=32, in_chans=3))
    assert not torch.equal(m.codebook.weight, m2.codebook.weight)
    m2.load_state_dict(load_file(str(path)), strict=True)
    assert torch.equal(m.tokenize(x), m2.tokenize(x))
    torch.testing.assert_close(m.reconstruct(x), m2.reconstruct(x), rtol=0, atol=0)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg(img_size=32, in_chans=3, kl_weight=0.1, kl_warmup_steps=0))
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = m(x, step=3)
        codes = m.tokenize(x)
        img = m.decode(codes)
        assert m.encode_logits(x).dtype == torch.bfloat16  # the convs really ran in bf16
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(m.codebook.weight.grad.abs().sum()) > 0
    assert codes.shape == (2, 64) and img.dtype == torch.float32 and img.shape == (2, 3, 32, 32)
    # straight-through Gumbel and the logit-Laplace loss under autocast too
    st = DiscreteVAE(tiny_cfg(straight_through=True, rec_loss="logit-laplace", pixel_map="dall-e"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = st(torch.rand(2, 1, 16, 16), step=0)
    loss.backward()
    assert math.isfinite(loss.item()) and st.codebook.weight.grad is not None


# ------------------------------------------------------------------------- DALL-E files in both torch formats
def assert_parity(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    """The parity rule (docs/testing.md): within 1e-4 of the reference's largest magnitude."""
    scale = ours.abs().max().item()
    assert scale > 0 and (theirs - ours).abs().max().item() <= 1e-4 * scale


def _trained_dalle(seed: int = 0):
    """The `dall_e` package's own modules with weights far from their init: every convolution rescaled per output
    channel and given a visible bias, so activations and logits sit on a trained model's scale."""
    from dall_e import Decoder, Encoder

    torch.manual_seed(seed)
    enc = Encoder(n_hid=32, n_blk_per_group=1, vocab_size=128)
    dec = Decoder(n_init=16, n_hid=32, n_blk_per_group=1, vocab_size=128)
    with torch.no_grad():
        for m in (enc, dec):
            for name, p in m.named_parameters():
                if name.endswith(".w"):
                    p.mul_(torch.empty(p.shape[0], 1, 1, 1).uniform_(0.5, 3.0))
                else:
                    p.normal_(0.0, 0.5)
    return enc.eval(), dec.eval()


@pytest.mark.parametrize("zip_format", [False, True])
def test_dalle_files_in_either_torch_format_reproduce_dall_e(tmp_path, zip_format):
    """encoder.pkl / decoder.pkl written by `torch.save(module)` in the legacy (pre-zip) or the zip format: the
    loaded dVAE's encoder logits and decoder images equal the `dall_e` modules' own forward."""
    from dall_e import map_pixels, unmap_pixels

    from beitv2.interop.dalle import is_dalle_file, load_dalle

    enc, dec = _trained_dalle()
    torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=zip_format)
    torch.save(dec, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=zip_format)
    with open(tmp_path / "encoder.pkl", "rb") as f:
        assert (f.read(2) == b"PK") == zip_format  # really the format under test
    assert is_dalle_file(tmp_path / "encoder.pkl") and is_dalle_file(tmp_path / "decoder.pkl")
    model = load_dalle(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", img_size=32)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = enc(map_pixels(x))
        ours = model.encode_logits(x)
    assert ref.abs().max() > 10  # trained-scale logits, not a near-uniform init
    assert_parity(ours, ref)
    codes = ref.argmax(1)
    assert torch.equal(model.tokenize(x), codes.flatten(1))
    with torch.no_grad():
        z = torch.nn.functional.one_hot(codes, 128).permute(0, 3, 1, 2).float()
        ref_img = unmap_pixels(torch.sigmoid(dec(z)[:, :3]))
    assert_parity(model.decode(codes), ref_img)
    # the command line reads the legacy format too
    from beitv2.checkpoint import load_model
    from beitv2.cli import main

    out = tmp_path / "dvae.safetensors"
    assert main(["convert", "--from", "dalle", "--to", "beitv2", "--img-size", "32", str(tmp_path / "encoder.pkl"),
                 str(out)]) == 0
    loaded, kind, _ = load_model(out)
    assert kind == "dvae" and torch.equal(loaded.tokenize(x), codes.flatten(1))


@pytest.mark.parametrize("zip_format", [False, True])
def test_dalle_reader_refuses_disallowed_globals_in_either_format(tmp_path, zip_format):
    """A pickle naming a global outside the allow-list is refused before anything runs, in both formats."""
    import os
    import pickle

    from beitv2.interop.dalle import is_dalle_file, load_dalle, read_torch_pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pkl", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os).system"):
        read_torch_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    torch.save({"f": print}, tmp_path / "builtin.pkl", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_torch_pickle(tmp_path / "builtin.pkl")
    # tensors (a strided view included) in a dict load with their values; a file naming no DALL-E class is not one
    torch.save({"w": torch.arange(6.0).view(2, 3)[:, 1:]}, tmp_path / "ok.pkl",
               _use_new_zipfile_serialization=zip_format)
    assert torch.equal(read_torch_pickle(tmp_path / "ok.pkl")["w"], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    assert not is_dalle_file(tmp_path / "ok.pkl")
    with pytest.raises(ValueError, match="not a DALL-E dVAE encoder"):
        load_dalle(tmp_path / "ok.pkl")
    (tmp_path / "text.pkl").write_text("not a torch file")
    with pytest.raises(ValueError, match="not a torch.save file"):
        read_torch_pickle(tmp_path / "text.pkl")
