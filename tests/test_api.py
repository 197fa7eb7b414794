"""The top-level Python API: create_model with overrides, load_model with kind and config, masks.batch."""

import pytest
import torch

import beitv2
from beitv2.checkpoint import save_model
from beitv2.config import ConfigError
from beitv2.masking import BlockwiseMaskGenerator, RandomMaskGenerator


def test_create_model_with_overrides():
    m = beitv2.create_model("beitv2_tiny", vocab_size=512, backbone={"depth": 4})
    assert m.kind == "mim" and m.config.vocab_size == 512 and m.config.backbone.depth == 4
    assert len(m.blocks if hasattr(m, "blocks") else m.backbone.blocks) == 4
    assert m.config.backbone.embed_dim == beitv2.create_model("beitv2_tiny").config.backbone.embed_dim  # kept
    with pytest.raises(ConfigError, match="no_such_field"):
        beitv2.create_model("vit_tiny", no_such_field=1)
    with pytest.raises(ConfigError, match="depth"):
        beitv2.create_model("vit_tiny", depth=0)


def test_load_model_gives_kind_and_config(tmp_path):
    vit = beitv2.create_model("vit_tiny", depth=2)
    save_model(tmp_path / "vit.safetensors", vit)
    back = beitv2.load_model(tmp_path / "vit.safetensors")
    assert back.kind == "vit" and back.config.depth == 2 and not back.training
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(back(x), vit.eval()(x))


@pytest.mark.parametrize("gen", [BlockwiseMaskGenerator((7, 7), 20, 4, seed=0), RandomMaskGenerator((7, 7), 20, 0)])
def test_mask_batch_is_a_bool_tensor(gen):
    b = gen.batch(5)
    assert b.dtype == torch.bool and b.shape == (5, 49)
    assert (b.sum(1) == 20).all()
    assert not all(torch.equal(b[0], b[i]) for i in range(1, 5))  # a fresh mask per image
