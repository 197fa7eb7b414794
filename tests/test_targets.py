"""The pre-training targets (`beitv2.mim_targets`) behind the one `MIMTask`: labels made by hand (codes by the
tokenizer then boolean indexing, pixel patches cut out one by one, teacher features then boolean indexing) and each
head's loss written out here give bit-for-bit the task's loss (`BEiTv2ForMIM.loss`), metrics and gradients, given
the boolean mask or the static-shape index, with and without patch aggregation. `build_target` reads the pretrain
config and names a wrong field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import tiny_mim, tiny_vit, tiny_vqkd

from beitv2.checkpoint import save_model
from beitv2.commands.pretrain import PretrainConfig
from beitv2.config import ConfigError, from_dict
from beitv2.masking import build_mask_generator
from beitv2.mim_targets import FeatureTarget, PixelTarget, TokenTarget, build_target
from beitv2.models.backbone import BEiTViT
from beitv2.models.mim import MaskedPatches
from beitv2.tasks import MIMTask
from beitv2.teachers import TeacherConfig, build_teacher

P = 4  # patch size; 16 px images -> a 4 x 4 grid


MIM = {"seed": 1, "target_dim": 24}  # the same draws whatever the target; feature targets are the teacher's 24 dims
TOKENIZER = {"seed": 2, "kmeans_init": False}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_vit(embed_dim=24, depth=1, use_mean_pooling=True)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(path, BEiTViT(cfg), "vit", cfg)
    return path


def tiny_teacher(path):
    return build_teacher(TeacherConfig(kind="beitv2", name_or_path=str(path), bf16=False), (4, 4))


def batch(with_index: bool, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    gen = build_mask_generator("block", (4, 4), 6, min_num_patches=2)
    rng = np.random.default_rng(0)
    masks = torch.stack([torch.from_numpy(gen(rng)).flatten() for _ in range(n)])
    b = {"image": torch.randn(n, 3, 16, 16, generator=g), "tokenizer_image": torch.rand(n, 3, 16, 16, generator=g),
         "mask": masks}
    if with_index:
        b["mask_index"] = torch.stack([m.nonzero().flatten() for m in masks])
    return b


def pixel_labels_by_hand(images: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Each masked patch cut out of the image, (p, p, C) order, row-major over the grid, optionally normalised."""
    rows = []
    for b in range(images.shape[0]):
        for r in range(4):
            for c in range(4):
                if mask[b, r * 4 + c]:
                    rows.append(images[b, :, r * P:(r + 1) * P, c * P:(c + 1) * P].permute(1, 2, 0).reshape(-1))
    t = torch.stack(rows).float()
    if normalize:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    return t


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_task(task: MIMTask, b: dict):
    task.model.zero_grad(set_to_none=True)
    loss, metrics = task(b)
    loss.backward()
    return loss.detach(), metrics, grads(task.model)


def run_by_hand(model, b: dict, labels: torch.Tensor, head_loss):
    """Each head's float predictions against the labels, summed."""
    model.zero_grad(set_to_none=True)
    outs = model(b["image"], b.get("mask_index", b["mask"]))
    losses = [head_loss(o.float(), labels) for o in outs]
    total = sum(losses[1:], losses[0])
    total.backward()
    return total.detach(), [x.detach() for x in losses], outs, grads(model)


def assert_same(task_run, hand_run):
    loss, metrics, g = task_run
    want, head_losses, _, g_want = hand_run
    assert torch.equal(loss, want)
    for i, h in enumerate(head_losses, start=1):
        assert torch.equal(metrics[f"loss_{i}"], h)
    assert g.keys() == g_want.keys() and len(g) > 10
    for n in g:
        assert torch.equal(g[n], g_want[n]), n


@pytest.mark.parametrize("aggregation", [True, False])
@pytest.mark.parametrize("with_index", [True, False])
def test_token_target_equals_cross_entropy_on_hand_labels(aggregation, with_index):
    model, tok = tiny_mim(target="tokens", patch_aggregation=aggregation, **MIM), tiny_vqkd(**TOKENIZER).eval()
    task = MIMTask(model, TokenTarget(tok)).train()
    b = batch(with_index)
    with torch.no_grad():
        labels = tok.tokenize(b["tokenizer_image"])[b["mask"].bool()]
    hand = run_by_hand(model, b, labels, F.cross_entropy)
    got = run_task(task, b)
    assert_same(got, hand)
    heads = 2 if aggregation else 1
    for i, out in enumerate(hand[2], start=1):
        assert torch.equal(got[1][f"mlm_acc_{i}"], (out.argmax(-1) == labels).float().mean())
    assert list(got[1]) == [k for i in range(1, heads + 1) for k in (f"mlm_acc_{i}", f"loss_{i}")]


@pytest.mark.parametrize("aggregation", [True, False])
@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_target_equals_mse_on_hand_cut_patches(aggregation, with_index, normalize):
    model = tiny_mim(target="pixels", patch_aggregation=aggregation, **MIM)
    model.config.norm_pix_loss = normalize
    task = MIMTask(model, PixelTarget(model.config)).train()
    b = batch(with_index)
    labels = pixel_labels_by_hand(b["image"], b["mask"].bool(), normalize)
    picked = MaskedPatches(b.get("mask_index", b["mask"]), 16).take(task.target.per_patch(b["image"]))
    assert torch.equal(picked, labels)
    got = run_task(task, b)
    assert_same(got, run_by_hand(model, b, labels, F.mse_loss))
    assert set(got[1]) == {f"loss_{i}" for i in range(1, 3 if aggregation else 2)}


@pytest.mark.parametrize("aggregation", [True, False])
@pytest.mark.parametrize("with_index", [True, False])
def test_feature_target_equals_one_minus_cosine_on_hand_labels(teacher_file, aggregation, with_index):
    model = tiny_mim(target="features", patch_aggregation=aggregation, **MIM)
    teacher = tiny_teacher(teacher_file)
    task = MIMTask(model, FeatureTarget(teacher)).train()
    b = batch(with_index)
    with torch.no_grad():
        labels = teacher(b["tokenizer_image"])[b["mask"].bool()]

    def one_minus_cos(out, y):
        return (1.0 - F.cosine_similarity(out, y, dim=-1)).mean()

    hand = run_by_hand(model, b, labels, one_minus_cos)
    got = run_task(task, b)
    assert_same(got, hand)
    assert torch.equal(got[1]["target_cos"], F.cosine_similarity(hand[2][0].float(), labels, dim=-1).mean())
    assert not task.target.training and not any(p.requires_grad for p in teacher.parameters())


def test_frozen_part_is_compiled_beside_the_model_and_stays_out_of_the_checkpoint(teacher_file):
    tok = tiny_vqkd(**TOKENIZER).eval()
    token_task = MIMTask(tiny_mim(target="tokens", **MIM), TokenTarget(tok))
    assert set(token_task.helper_fns()) == {"target"}  # what `compile_task` compiles
    feature_task = MIMTask(tiny_mim(target="features", **MIM), FeatureTarget(tiny_teacher(teacher_file)))
    assert set(feature_task.helper_fns()) == {"target"}
    pixel_model = tiny_mim(target="pixels", **MIM)
    assert MIMTask(pixel_model, PixelTarget(pixel_model.config)).helper_fns() == {}  # no frozen network
    # the compiled call is the one the task uses
    calls = []
    token_task.wrap(token_task.model, {"target": lambda x: calls.append(x.shape) or tok.tokenize(x)})
    token_task(batch(True))
    assert calls == [(4, 3, 16, 16)]
    # the trainer saves task.model: no tokenizer weights among its keys, and the task keeps the tokenizer frozen
    assert not any(k.startswith(("target", "tokenizer", "encoder.")) for k in token_task.model.state_dict())
    token_task.train()
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


def pretrain_config(**model) -> PretrainConfig:
    vit = {"img_size": [16], "patch_size": P, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return from_dict(PretrainConfig, {"model": {"backbone": vit, "early_layers": 1, "head_layers": 1, **model}})


def test_build_target_from_the_pretrain_config(tmp_path, teacher_file):
    tok_path = tmp_path / "tok.safetensors"
    save_model(tok_path, tiny_vqkd(**TOKENIZER).eval())
    cfg = pretrain_config(vocab_size=16)
    cfg.tokenizer.checkpoint = str(tok_path)
    t = build_target(cfg)
    assert isinstance(t, TokenTarget) and t.second_size == (16, 16) and t.description.startswith("vqkd tokenizer")
    cfg = pretrain_config(target="pixels")
    t = build_target(cfg)
    assert isinstance(t, PixelTarget) and t.config is cfg.model and t.second_size == (16, 16)
    cfg = pretrain_config(target="features", target_dim=24)
    cfg.teacher = TeacherConfig(kind="beitv2", name_or_path=str(teacher_file), bf16=False)
    t = build_target(cfg)
    assert isinstance(t, FeatureTarget) and t.description.endswith("features (24-d)")
    cfg.model.target_dim = 16
    with pytest.raises(ConfigError, match=r"^model\.target_dim: 16 differs .* 24"):
        build_target(cfg)
    cfg = pretrain_config(vocab_size=16)
    cfg.tokenizer.checkpoint = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match=r"^tokenizer\.checkpoint"):
        build_target(cfg)
