from functools import partial

import numpy as np
import pytest
import torch
from builders import tiny_mim, tiny_vqkd

from beitv2.checkpoint import load_model, save_model
from beitv2.config import ConfigError
from beitv2.masking import BlockwiseMaskGenerator
from beitv2.models.architectures import build_model, count_learnable, get_architecture, list_architectures
from beitv2.models.mim import BEiTv2ForMIM, patchify, pixel_targets
from beitv2.models.vqkd import VQKD

# three blocks (room to move early_layers) and 64 codes; keywords still override
mim_model = partial(tiny_mim, vit={"depth": 3}, vocab_size=64, early_layers=2, head_layers=2)
vqkd_model = partial(tiny_vqkd, encoder={"depth": 2}, num_codes=64, code_dim=8, teacher_dim=24)


def masks(n, grid=4, k=6, seed=0):
    g = BlockwiseMaskGenerator(grid, k, min_num_patches=2, seed=seed)
    return torch.from_numpy(np.stack([g().ravel() for _ in range(n)]))


def test_paper_presets_have_the_official_learnable_parameter_counts():
    with torch.device("meta"):
        assert count_learnable(build_model("beitv2_base_patch16_224")) == 106_143_056
        assert count_learnable(build_model("vqkd_encoder_base_decoder_3x768x12_clip")) == 108_829_216
        assert count_learnable(build_model("vqkd_encoder_base_decoder_1x768x12_clip")) == 94_655_008
        assert count_learnable(build_model("beit_base_patch16_224_8k_vocab")) == 91_965_776
        assert count_learnable(build_model("beitv2_large_patch16_224")) == 336_728_512
        assert count_learnable(build_model("beitv2_base_patch16_224_ft")) == 86_530_984


@pytest.mark.parametrize("name", [n for n in list_architectures() if get_architecture(n)[0] != "dvae"])
def test_every_preset_builds_and_runs_at_a_small_size(name):
    kind, cfg = get_architecture(name)
    if kind == "vqkd":
        cfg.encoder.img_size, cfg.encoder.depth, cfg.decoder_depth = (2 * cfg.encoder.patch_size,), 1, 1
    elif kind in ("mim", "vit"):
        b = cfg.backbone if kind == "mim" else cfg
        b.img_size, b.depth = (2 * b.patch_size,), 2
        if kind == "mim":
            cfg.early_layers = 1
    else:
        pytest.skip("dVAE presets are tested with the dVAE")
    model = {"vqkd": VQKD, "mim": BEiTv2ForMIM}.get(kind)
    if model is None:
        from beitv2.models.backbone import BEiTViT as model
    m = model(cfg).eval()
    c = cfg.encoder.in_chans if kind == "vqkd" else (cfg.backbone if kind == "mim" else cfg).in_chans
    p = cfg.encoder.patch_size if kind == "vqkd" else (cfg.backbone if kind == "mim" else cfg).patch_size
    x = torch.rand(2, c, 2 * p, 2 * p)
    with torch.no_grad():
        if kind == "vqkd":
            assert m.tokenize(x).shape == (2, 4)
        elif kind == "mim":
            mask = torch.tensor([[True, False, True, False]] * 2)
            outs = m(x, mask)
            assert len(outs) == (2 if cfg.patch_aggregation else 1)
            assert all(o.shape == (4, cfg.vocab_size) for o in outs)
        else:
            out = m(x)
            assert out.shape == (2, cfg.num_classes or cfg.embed_dim)


def test_vqkd_forward_tokenize_and_official_keys():
    torch.manual_seed(0)
    m = vqkd_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    loss, metrics = m.train()(x, torch.randn(3, 16, 24, generator=g))
    assert loss.ndim == 0 and {"rec_loss", "quant_loss", "teacher_cos"} <= set(metrics)
    assert torch.isclose(loss, metrics["rec_loss"] + metrics["quant_loss"])
    codes = m.eval().tokenize(x)
    assert codes.shape == (3, 16) and codes.dtype == torch.long and int(codes.max()) < 64
    # tokenize = nearest code (cosine) of the normalised encoder output, row-major
    # k-means with fewer samples (48) than codes (64) leaves duplicate codes, so the nearest code can tie exactly:
    # check that the chosen code is *a* nearest one (its cosine is the maximum), which ties cannot make ambiguous
    z = torch.nn.functional.normalize(m.encode(x), dim=-1)
    sims = z @ m.quantize.codebook.t()
    torch.testing.assert_close(sims.gather(-1, codes[..., None])[..., 0], sims.max(-1).values, rtol=0, atol=1e-6)
    assert (sims.max(-1).values - sims.median(-1).values).min() > 1e-3  # and it is not a flat field
    keys = set(m.state_dict())
    for k in ["encoder.cls_token", "encoder.pos_embed", "encoder.fc_norm.weight", "encode_task_layer.0.weight",
              "encode_task_layer.2.weight", "quantize.embedding.weight", "quantize.cluster_size",
              "decoder.patch_embed.proj.weight", "decoder.fc_norm.bias", "decode_task_layer.2.weight"]:
        assert k in keys, k
    assert m.decoder.patch_embed.proj.weight.shape == (32, 8, 1, 1)
    with pytest.raises(ValueError, match="grid"):
        m(x, torch.randn(3, 9, 24))


def test_vqkd_input_convention_is_zero_one_mapped_to_minus_one_one():
    m = vqkd_model()
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(m.pre_process(x), x * 2 - 1)


def test_mim_heads_losses_and_keys():
    m = mim_model()
    x = torch.randn(2, 3, 16, 16)
    mask = masks(2)
    outs = m(x, mask)
    assert len(outs) == 2 and outs[0].shape == (12, 64)
    codes = torch.randint(0, 64, (2, 16))  # a code per patch; the loss reads the masked ones
    loss, met = m.loss(outs, codes, mask)
    assert torch.isclose(loss, met["loss_1"] + met["loss_2"])
    for i, out in enumerate(outs, start=1):
        assert torch.equal(met[f"loss_{i}"], torch.nn.functional.cross_entropy(out, codes[mask]))
        assert torch.equal(met[f"mlm_acc_{i}"], (out.argmax(-1) == codes[mask]).float().mean())
    keys = set(m.state_dict())
    assert {"mask_token", "lm_head.weight", "cls_pt_layers.1.attn.qkv.weight", "norm.weight",
            "rel_pos_bias.relative_position_bias_table"} <= keys
    assert not any(k.startswith("cls_pt_norm") for k in keys)
    sep = mim_model(shared_lm_head=False)
    assert {"cls_pt_norm.weight", "cls_pt_lm_head.weight"} <= set(sep.state_dict())
    v1 = mim_model(patch_aggregation=False)
    assert len(v1(x, mask)) == 1 and not any(k.startswith("cls_pt") for k in v1.state_dict())
    assert not any(k.startswith(("lm_head", "mask_token", "cls_pt")) for k in m.backbone_state_dict())


def test_patch_aggregation_reads_layer_l_patches_and_last_cls():
    m = mim_model().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = masks(2)
    with torch.no_grad():
        before = m(x, mask)
        # perturbing the last block changes head 1, and head 2 only through the CLS token
        m.blocks[2].mlp.fc2.bias.add_(torch.randn(32))  # not constant: LayerNorm ignores shifts
        after = m(x, mask)
    assert not torch.allclose(before[0], after[0])
    assert not torch.allclose(before[1], after[1])
    m2 = mim_model(early_layers=3)
    assert m2.config.early_layers == 3
    with pytest.raises(ConfigError, match="early_layers"):
        mim_model(early_layers=4)


def test_regression_targets():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    p = patchify(imgs, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[0, 1, :3], imgs[0, :, 0, 4])  # patch (0,1), first pixel, all channels
    t = pixel_targets(imgs, 4, normalize=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 4), atol=1e-5)
    m = mim_model(target="pixels")
    outs = m(torch.randn(2, 3, 16, 16), masks(2))
    assert outs[0].shape == (12, 48)
    m = mim_model(target="features", target_dim=24)
    mask, feats = masks(2), torch.randn(2, 16, 24)
    outs = m(torch.randn(2, 3, 16, 16), mask)
    loss, met = m.loss(outs, feats, mask)
    cos = torch.nn.functional.cosine_similarity(outs[0], feats[mask], dim=-1)
    assert loss.item() > 0 and torch.allclose(met["target_cos"], cos.mean())
    assert torch.allclose(met["loss_1"], 1 - cos.mean(), atol=1e-6)


def _steps(fn, params, n=15, lr=5e-3):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(n):
        loss = fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_optimizer_steps_lower_both_losses():
    torch.manual_seed(0)
    vq = vqkd_model().train()
    x = torch.rand(8, 3, 16, 16)
    teacher = torch.randn(8, 16, 24)
    losses = _steps(lambda: vq(x, teacher)[0], [p for p in vq.parameters() if p.requires_grad])
    assert losses[-1] < losses[0] - 0.1
    mim = mim_model().train()
    mask = masks(8)
    codes = torch.randint(0, 64, (8, 16))
    losses = _steps(lambda: mim.loss(mim(x, mask), codes, mask)[0], mim.parameters())
    assert losses[-1] < losses[0] - 0.5


def test_bf16_autocast_on_cpu_end_to_end():
    vq, mim = vqkd_model().train(), mim_model().train()
    x = torch.rand(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = vq(x, torch.randn(4, 16, 24))
        codes = vq.eval().tokenize(x)
        mask = masks(4)
        outs = mim(x, mask)
        assert outs[0].dtype == torch.bfloat16
        mloss, _ = mim.loss(outs, codes, mask)
    (loss + mloss).backward()
    assert torch.isfinite(loss) and torch.isfinite(mloss)
    assert mim.mask_token.grad is not None and vq.encoder.cls_token.grad is not None


def test_model_file_round_trip(tmp_path):
    m = mim_model()
    save_model(tmp_path / "m.safetensors", m)
    m2, kind, cfg = load_model(tmp_path / "m.safetensors")
    assert kind == "mim" and cfg["early_layers"] == 2
    x, mask = torch.randn(2, 3, 16, 16), masks(2)
    with torch.no_grad():
        assert torch.equal(m.eval()(x, mask)[1], m2(x, mask)[1])
    vq = vqkd_model()
    vq.train()(torch.rand(2, 3, 16, 16), torch.randn(2, 16, 24))
    save_model(tmp_path / "t.safetensors", vq)
    vq2, kind, _ = load_model(tmp_path / "t.safetensors")
    x = torch.rand(2, 3, 16, 16)
    assert kind == "vqkd" and torch.equal(vq.eval().tokenize(x), vq2.tokenize(x))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)header|safetensor|invalid|deserial"):
        load_model(tmp_path / "bad.safetensors")
