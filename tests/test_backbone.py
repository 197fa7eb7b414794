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
    x = torch.randn(2, ours.cfg.in_chans, *ours.cfg.img_hw)
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
