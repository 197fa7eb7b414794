"""The backbone against timm's Beit: same config, same state dict, identical outputs."""

import dataclasses

import pytest
import torch
from timm.models.beit import Beit

from beitv2.config import ConfigError
from beitv2.models.backbone import BEiTViT, ViTConfig

CASES = {
    # pre-training layout: shared table, layer scale, CLS pooling
    "shared_cls": dict(vit=dict(use_shared_rel_pos_bias=True, init_values=0.1, num_classes=10),
                       timm=dict(use_shared_rel_pos_bias=True, init_values=0.1, global_pool="token", num_classes=10,
                                 use_abs_pos_emb=False)),
    # fine-tuning layout: per-layer tables, mean pooling + fc_norm
    "perlayer_mean": dict(vit=dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mean_pooling=True,
                                   num_classes=7),
                          timm=dict(use_rel_pos_bias=True, global_pool="avg", num_classes=7, init_values=0.1,
                                    use_abs_pos_emb=False)),
    # VQ-KD encoder layout on a grayscale, non-square input: abs positions, no layer scale, no head
    "abs_gray_rect": dict(vit=dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, init_values=0.0,
                                   use_mean_pooling=True, in_chans=1, img_size=(24, 32)),
                          timm=dict(use_abs_pos_emb=True, init_values=None, global_pool="avg", num_classes=0,
                                    in_chans=1, img_size=(24, 32))),
}


def _pair(case):
    base = dict(img_size=(32,), patch_size=4, embed_dim=64, depth=3, num_heads=4)
    ours = BEiTViT(ViTConfig(**{**base, **CASES[case]["vit"]}))
    tb = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)
    theirs = Beit(**{**tb, **CASES[case]["timm"]})
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_moves_both_ways_with_identical_outputs(case):
    ours, theirs = _pair(case)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, ours.vit_config.in_chans, *ours.vit_config.img_hw)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    # and back: timm's random init into ours
    theirs2 = _pair(case)[1]
    ours.load_state_dict(theirs2.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs2(x), atol=1e-5)


def test_official_parameter_names():
    m = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                          use_abs_pos_emb=True))
    keys = set(m.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "rel_pos_bias.relative_position_bias_table",
              "blocks.1.norm1.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias",
              "blocks.1.attn.proj.weight", "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
              "blocks.1.gamma_1", "blocks.1.gamma_2", "norm.weight", "head.weight"]:
        assert k in keys, k
    assert "blocks.0.attn.qkv.bias" not in keys  # the key has no bias
    # shared table: ((2*4-1)^2 + 3) rows x heads
    assert m.rel_pos_bias.relative_position_bias_table.shape == (7 * 7 + 3, 2)


def test_sdpa_path_matches_explicit_softmax_and_attention_maps():
    ours, _ = _pair("shared_cls")
    torch.nn.init.normal_(ours.rel_pos_bias.relative_position_bias_table, std=0.5)
    assert all(b.attn.fused_attn for b in ours.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = ours(x)
        for b in ours.blocks:
            b.attn.fused_attn = False
        explicit = ours(x)
    assert torch.allclose(fused, explicit, atol=1e-5)
    maps = ours.attention_maps(x, layer=-1)
    assert maps.shape == (2, 4, 65, 65)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 65), atol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_attention_maps_are_the_weights_timms_attention_applies(per_layer):
    """The maps of block l, times that block's values, projected, give timm's own `Attention` output there (timm's
    module run on the same weights): the figure shows the weights the model uses, with the shared or the per-layer
    relative position bias."""
    from timm.models.beit import Attention

    torch.manual_seed(0)  # the flatness check below reads random weights and inputs: not those of the test order
    case = "perlayer_mean" if per_layer else "shared_cls"
    ours, theirs = _pair(case)
    for n, t in ours.named_parameters():
        if "relative_position_bias_table" in n:
            torch.nn.init.normal_(t, std=0.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = ours.embed(x)
        bias = ours.rel_pos_bias_for_blocks()
        h = ours.blocks[0](h, shared_rel_pos_bias=bias)
        maps = ours.attention_maps(x, layer=1)
        timm_attn = theirs.blocks[1].attn
        assert type(timm_attn) is Attention
        y = theirs.blocks[1].norm1(h)
        want = timm_attn(y, shared_rel_pos_bias=theirs.rel_pos_bias() if theirs.rel_pos_bias is not None else None)
        a = ours.blocks[1].attn
        v = torch.nn.functional.linear(y, a.qkv.weight[128:], a.v_bias).reshape(2, 65, 4, 16).transpose(1, 2)
        got = a.proj((maps @ v).transpose(1, 2).reshape(2, 65, 64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # not a flat field: the biases and queries matter (a typical query row spans about 0.04 over the 65 keys; a few
    # rows of some draws are nearly flat, so the median is checked, not the minimum)
    assert float((maps.amax(-1) - maps.amin(-1)).median()) > 1e-2


def test_intermediate_layers_mask_token_and_official_init():
    m = BEiTViT(ViTConfig(img_size=(32,), patch_size=4, embed_dim=64, depth=4, num_heads=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    last, saved = m.forward_features(x, return_layers=(2, 4))
    assert set(saved) == {2, 4} and torch.equal(saved[4], last)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    token = torch.randn(1, 1, 64)
    emb = m.embed(x, mask, token)
    assert torch.allclose(emb[:, 1:11], token.expand(2, 10, 64) + 0)  # replaced before CLS/positions (no abs pos)
    with pytest.raises(ValueError):
        m.embed(x, mask, None)
    # official pre-training init: truncated at +-1 std, residual projections of layer l divided by sqrt(2l)
    w = m.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-7 and w.std() > 0.01
    assert m.blocks[3].attn.proj.weight.abs().max() <= 0.02 / (8 ** 0.5) + 1e-7


def test_set_input_size_resizes_tables_and_runs():
    m = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=True))
    m.set_input_size(24)
    assert m.grid_size == (6, 6)
    assert m.rel_pos_bias.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 32)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = dict(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    a = BEiTViT(ViTConfig(**cfg))
    b = BEiTViT(ViTConfig(**cfg, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    ga = a.rel_pos_bias.relative_position_bias_table.grad
    assert ga.abs().sum() > 0 and torch.allclose(ga, b.rel_pos_bias.relative_position_bias_table.grad, atol=1e-6)


def test_set_input_size_uses_the_official_cubic_remap():
    from beitv2.models.relpos import resize_rel_pos_table

    m = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2))
    torch.nn.init.normal_(m.rel_pos_bias.relative_position_bias_table)
    expected = resize_rel_pos_table(m.rel_pos_bias.relative_position_bias_table.data.clone(), (4, 4), (6, 6))
    m.set_input_size(24)
    assert torch.allclose(m.rel_pos_bias.relative_position_bias_table, expected)
    assert m.rel_pos_bias.relative_position_index.max() == expected.shape[0] - 1


def test_cpu_training_on_short_sequences_uses_the_math_kernel_with_the_same_gradients(monkeypatch):
    """The kernel choice is a speed decision only: gradients match the flash kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from beitv2.models.backbone import CPU_MATH_ATTENTION_MAX_TOKENS, attention_kernel

    short, long = torch.zeros(1, 50, 8), torch.zeros(1, CPU_MATH_ATTENTION_MAX_TOKENS, 8)
    assert type(attention_kernel(short)).__name__ != "nullcontext"
    assert type(attention_kernel(long)).__name__ == "nullcontext"
    with torch.no_grad():
        assert type(attention_kernel(short)).__name__ == "nullcontext"
    torch.manual_seed(0)
    model = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                              use_shared_rel_pos_bias=False, use_abs_pos_emb=True))  # no bias: flash is eligible
    x = torch.randn(4, 3, 16, 16)
    model(x).square().sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr("beitv2.models.backbone.CPU_MATH_ATTENTION_MAX_TOKENS", 0)  # never choose math
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(x).square().sum().backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_default_config_is_the_official_base_and_checks_its_options():
    """`ViTConfig()` is BEiT v2 base pre-training (`beit_base_patch16_224_8k_vocab`): 224 px, 16 px patches, 768 wide,
    12 blocks of 12 heads, MLP ratio 4, q/v biases, shared relative position bias."""
    c = ViTConfig()
    assert (c.img_hw, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.num_heads) == ((224, 224), 16, 3, 768, 12, 12)
    assert c.mlp_ratio == 4.0 and c.qkv_bias is True
    assert c.use_shared_rel_pos_bias and not c.use_rel_pos_bias and not c.use_abs_pos_emb
    with pytest.raises(ConfigError, match="use_rel_pos_bias"):  # per-layer and shared tables are exclusive
        dataclasses.replace(c, use_rel_pos_bias=True).validate()
    with pytest.raises(ConfigError, match="num_classes"):
        dataclasses.replace(c, num_classes=-1).validate()


def _far_from_init(model: BEiTViT, seed: int = 0) -> BEiTViT:
    """Layer-scale gammas 1, every relative position table and the head N(0, 1): trained-scale weights, where an
    attention-path or drop-path difference cannot hide under tiny residual branches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma_" in name:
                p.fill_(1.0)
            elif "relative_position_bias_table" in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


BIAS_LAYOUTS = {"none": dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True),
                "shared": dict(use_shared_rel_pos_bias=True),
                "per_layer": dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)}


@pytest.mark.parametrize("bias", sorted(BIAS_LAYOUTS))
@pytest.mark.parametrize("path", ["forced_math", "explicit", "sdpa"])
def test_grad_checkpointing_gives_the_same_gradients_on_every_attention_path(path, bias, monkeypatch):
    """Checkpointed blocks recompute their forward in backward. On CPU with fewer than 128 tokens the forward runs
    under a forced SDPA kernel; the recomputation must run the same one (else torch raises `CheckpointError` on
    differing saved-tensor metadata, or the gradients differ). `forced_math`: 17 tokens, SDPA forced to its math
    kernel; `explicit`: timm's matmul-softmax attention; `sdpa`: SDPA left to choose (no forced kernel)."""
    from beitv2.models import backbone as bb

    if path == "sdpa":
        monkeypatch.setattr(bb, "CPU_MATH_ATTENTION_MAX_TOKENS", 0)
    cfg = dict(img_size=(16,), patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=3, init_values=0.1,
               drop_path_rate=0.2, **BIAS_LAYOUTS[bias])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain_model = _far_from_init(BEiTViT(ViTConfig(**cfg)))
    grads = []
    for ckpt in (False, True):
        model = BEiTViT(ViTConfig(**cfg, grad_checkpointing=ckpt)).train()
        model.load_state_dict(plain_model.state_dict())
        assert bb.forces_math_attention(torch.zeros(1, 17, 32)) == (path != "sdpa")
        if path == "explicit":
            for blk in model.blocks:
                blk.attn.fused_attn = False
        torch.manual_seed(5)  # the same drop-path draws in both runs (checkpointing replays the RNG state)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, checkpointed = grads
    assert set(plain) == set(checkpointed)
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_drop_path_rates_are_linspace_over_depth_as_official_and_timm(depth):
    """Official and timm: block i drops its residual branches with rate `torch.linspace(0, rate, depth)[i]`."""
    rate = 0.3
    m = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                          drop_path_rate=rate))
    expected = torch.linspace(0, rate, depth).tolist()
    for i, blk in enumerate(m.blocks):
        for dp in (blk.drop_path1, blk.drop_path2):
            p = dp.drop_prob if hasattr(dp, "drop_prob") else 0.0  # nn.Identity where the rate is 0
            assert p == pytest.approx(expected[i], abs=1e-7), (i, expected)
    timm_rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
                  for b in Beit(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                                drop_path_rate=rate).blocks]
    assert timm_rates == pytest.approx(expected, abs=1e-7)


def test_training_forward_with_stochastic_depth_equals_timms_draw_for_draw():
    """Train mode, same seed: timm's `Beit` (same weights, its own linspace rates) gives bit-comparable outputs,
    so the rates really reach the blocks and each branch is dropped as timm drops it."""
    cfg = CASES["shared_cls"]
    ours = _far_from_init(BEiTViT(ViTConfig(img_size=(32,), patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                            drop_path_rate=0.5, **cfg["vit"])))
    theirs = Beit(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, drop_path_rate=0.5, **cfg["timm"])
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, 3, 32, 32)
    outs = []
    for m in (ours.train(), theirs.train()):
        for blk in m.blocks:
            blk.attn.fused_attn = False  # one attention arithmetic for both
        torch.manual_seed(11)
        outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(outs[0], ours.eval()(x), atol=1e-3)  # drop path did drop something


def test_mim_aggregation_blocks_take_the_official_drop_path_rates():
    """Official `cls_pt_layers`: rates `linspace(0, dp, max(depth, early + head))[early + j]`."""
    from beitv2.models.mim import BEiTv2ForMIM, MIMConfig

    for depth, early, head in ((4, 3, 2), (6, 2, 2)):
        vit = ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=depth, num_heads=2, drop_path_rate=0.4)
        m = BEiTv2ForMIM(MIMConfig(backbone=vit, vocab_size=16, early_layers=early, head_layers=head))
        table = torch.linspace(0, 0.4, max(depth, early + head)).tolist()
        got = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in m.cls_pt_layers]
        assert got == pytest.approx(table[early:early + head], abs=1e-7)


@pytest.mark.parametrize("init_values", [0.0, 1e-5, 0.1])
def test_layer_scale_is_built_as_the_official_gammas(init_values):
    """`init_values > 0`: gamma_1 and gamma_2 of every block are (D,) filled with it; 0: no layer scale at all."""
    m = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=3, num_heads=2,
                          init_values=init_values))
    for blk in m.blocks:
        if init_values == 0:
            assert blk.gamma_1 is None and blk.gamma_2 is None
        else:
            for gamma in (blk.gamma_1, blk.gamma_2):
                assert gamma.shape == (32,) and torch.equal(gamma.detach(), torch.full((32,), init_values))
