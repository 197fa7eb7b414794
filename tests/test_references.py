"""Checks against independent references: computations written out by hand here from the papers' and official code's
definitions, SciPy's FITPACK spline, timm's resampler, timm's Mixup definitions. None of them calls the library
function it checks (see docs/testing.md for the bug each one was seen to catch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import tiny_mim, tiny_vqkd
from scipy.interpolate import RectBivariateSpline
from timm.layers import resample_abs_pos_embed

from beitv2.mim_targets import TokenTarget
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.mim import BEiTv2ForMIM
from beitv2.tasks import MIMTask


def large_mim(depth: int = 4, early: int = 2, head: int = 2, **kw) -> BEiTv2ForMIM:
    """Large weights, so CLS and every block visibly change the outputs."""
    vit = {"depth": depth, "init_values": 0.5, "init_std": 0.3}
    return tiny_mim(seed=0, vit=vit, vocab_size=64, early_layers=early, head_layers=head, **kw).eval()


def by_hand_mim(m: BEiTv2ForMIM, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """BEiT v2's two heads written out from the paper (sec. 3.3): the masked patches take the mask token, the blocks
    run one by one; head 1 reads the last block; the aggregation head reads [CLS after the LAST block, patch tokens
    after block l]. Only timm's block / bias modules and torch ops are used."""
    B = x.shape[0]
    p = m.vit_config.patch_size
    tokens = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    w = mask.reshape(B, -1, 1).float()
    tokens = tokens * (1 - w) + m.mask_token * w
    h = torch.cat([m.cls_token.expand(B, -1, -1), tokens], dim=1)
    bias = m.rel_pos_bias()
    after = []
    for blk in m.blocks:
        h = blk(h, shared_rel_pos_bias=bias)
        after.append(h)
    last = after[-1]
    sel = mask.reshape(B, -1).bool()
    out1 = m.lm_head(m.norm(last)[:, 1:][sel])
    g = torch.cat([last[:, :1], after[m.config.early_layers - 1][:, 1:]], dim=1)
    for blk in m.cls_pt_layers:
        g = blk(g, shared_rel_pos_bias=bias)
    norm, head = (m.norm, m.lm_head) if m.config.shared_lm_head else (m.cls_pt_norm, m.cls_pt_lm_head)
    out2 = head(norm(g)[:, 1:][sel])
    return [out1, out2]


def fixed_mask(B: int = 2) -> torch.Tensor:
    """An asymmetric [B, 4, 4] mask (its transpose differs), different per sample."""
    m = torch.zeros(B, 4, 4, dtype=torch.bool)
    m[0, 0, 1:4] = True
    m[0, 2, 0] = True
    m[1, 1:3, 3] = True
    m[1, 3, 0:2] = True
    return m


@pytest.mark.parametrize("early,shared", [(1, True), (2, True), (3, False)])
def test_aggregation_head_reads_last_cls_and_block_l_patches_by_hand(early, shared):
    m = large_mim(depth=4, early=early, head=2, shared_lm_head=shared)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    mask = fixed_mask()
    with torch.no_grad():
        got = m(x, mask)
        ref = by_hand_mim(m, x, mask)
        # the inputs a bug could pick instead (patches of the last block, CLS of block l) give different outputs
        for wrong in ("last_patches", "cls_of_l"):
            assert (ref[1] - by_hand_mim_variant(m, x, mask, wrong)).abs().max() > 1e-3, wrong  # >> the 1e-5 match
    assert len(got) == 2 and got[0].shape == (int(mask.sum()), 64)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


def by_hand_mim_variant(m, x, mask, which: str) -> torch.Tensor:
    B = x.shape[0]
    tokens = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    w = mask.reshape(B, -1, 1).float()
    h = torch.cat([m.cls_token.expand(B, -1, -1), tokens * (1 - w) + m.mask_token * w], dim=1)
    bias = m.rel_pos_bias()
    after = []
    for blk in m.blocks:
        h = blk(h, shared_rel_pos_bias=bias)
        after.append(h)
    early = after[m.config.early_layers - 1]
    g = torch.cat([h[:, :1], h[:, 1:]], 1) if which == "last_patches" else torch.cat([early[:, :1], early[:, 1:]], 1)
    for blk in m.cls_pt_layers:
        g = blk(g, shared_rel_pos_bias=bias)
    norm, head = (m.norm, m.lm_head) if m.config.shared_lm_head else (m.cls_pt_norm, m.cls_pt_lm_head)
    return head(norm(g)[:, 1:][mask.reshape(B, -1)])


def test_mim_without_aggregation_is_one_head_on_the_last_block_by_hand():
    m = large_mim(depth=3, patch_aggregation=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = m(x, fixed_mask())
        ref = by_hand_mim(_with_heads(m), x, fixed_mask())[0]
    assert len(got) == 1
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)


def test_masks_of_different_counts_per_image_give_the_boolean_indexing_outputs_and_loss():
    """BEiT v1's masking without top-up masks a different count per image: the forward pads the shorter rows and
    drops the padding, giving the by-hand outputs (boolean indexing after whole blocks) and their cross-entropy."""
    m = large_mim(depth=3, early=2, head=2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = fixed_mask()
    mask[1, 0, 0] = True  # 4 and 5 masked patches
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = m(x, mask)
        ref = by_hand_mim(m, x, mask)
        loss, metrics = m.loss(got, codes, mask)
    assert got[0].shape == (9, 64)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    labels = codes[mask.reshape(2, -1)]
    want = [F.cross_entropy(o, labels) for o in ref]
    torch.testing.assert_close(loss, want[0] + want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["loss_2"], want[1], rtol=1e-5, atol=1e-5)


def _with_heads(m):
    """by_hand_mim reads cls_pt_layers for head 2; a v1-style model has none, so give it an empty list."""
    m.cls_pt_layers = torch.nn.ModuleList() if m.cls_pt_layers is None else m.cls_pt_layers
    return m


# --------------------------------------------------------------------------------------------------- MIM labels

def test_mim_task_labels_are_tokenizer_view_codes_at_masked_positions_row_major():
    tok = tiny_vqkd(seed=3, num_codes=64, code_dim=8, teacher_dim=24).eval()
    model = large_mim(depth=2, early=1, head=1)
    task = MIMTask(model, TokenTarget(tok))
    g = torch.Generator().manual_seed(4)
    batch = {"image": torch.randn(2, 3, 16, 16, generator=g), "tokenizer_image": torch.rand(2, 3, 16, 16, generator=g),
             "mask": fixed_mask()}
    with torch.no_grad():
        codes = tok.tokenize(batch["tokenizer_image"])  # [B, 16], row-major patches
        wrong_view = tok.tokenize(batch["image"].clamp(0, 1))
        labels = torch.tensor([int(codes[b, r * 4 + c]) for b in range(2) for r in range(4) for c in range(4)
                               if batch["mask"][b, r, c]])
        col_major = torch.tensor([int(codes[b, r * 4 + c]) for b in range(2) for c in range(4) for r in range(4)
                                  if batch["mask"][b, r, c]])
        # preconditions: a swapped view or a column-major order would give other labels
        assert not torch.equal(labels, wrong_view[batch["mask"].reshape(2, -1)])
        assert not torch.equal(labels, col_major)
        out1, out2 = model(batch["image"], batch["mask"].reshape(2, -1))
        loss, metrics = task(batch)
    ref = F.cross_entropy(out1, labels) + F.cross_entropy(out2, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss_1"], F.cross_entropy(out1, labels), rtol=1e-5, atol=1e-6)
    assert float(metrics["mlm_acc_1"]) == pytest.approx(float((out1.argmax(-1) == labels).float().mean()))


# ----------------------------------------------------------------------------------- relative position resize

def official_source_coords(src: int, dst: int) -> np.ndarray:
    """The official fine-tuning code's geometric-progression sample positions, written out as it reads."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def scipy_resize(table: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    sh, sw, dh, dw = (2 * v - 1 for v in (*src, *dst))
    xh, xw = official_source_coords(sh, dh), official_source_coords(sw, dw)
    th, tw = np.arange(-(dh // 2), dh // 2 + 0.1), np.arange(-(dw // 2), dw // 2 + 0.1)
    heads = []
    for k in range(table.shape[1]):
        z = table[:-3, k].reshape(sh, sw)
        heads.append(RectBivariateSpline(xh, xw, z, kx=3, ky=3, s=0)(th, tw).reshape(-1))
    return np.concatenate([np.stack(heads, 1), table[-3:]])


# every window pair docs/interop.md says was checked against SciPy
@pytest.mark.parametrize("src,dst", [((14, 14), (24, 24)), ((4, 4), (6, 6)), ((7, 7), (12, 12)), ((8, 8), (5, 5)),
                                     ((5, 7), (8, 9))])
def test_rel_pos_resize_matches_scipy_fitpack_on_documented_windows(src, dst):
    from beitv2.models.relpos import resize_rel_pos_table

    rows = (2 * src[0] - 1) * (2 * src[1] - 1) + 3
    table = torch.randn(rows, 3, generator=torch.Generator().manual_seed(src[0] * 31 + dst[1]), dtype=torch.float64)
    got = resize_rel_pos_table(table, src, dst).numpy()
    ref = scipy_resize(table.numpy(), src, dst)
    assert got.shape == ref.shape == ((2 * dst[0] - 1) * (2 * dst[1] - 1) + 3, 3)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


def test_model_set_input_size_resizes_rel_pos_tables_like_scipy():
    torch.manual_seed(5)
    m = BEiTViT(ViTConfig(img_size=(20, 28), patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          use_rel_pos_bias=True, use_shared_rel_pos_bias=False))
    with torch.no_grad():
        m.blocks[0].attn.relative_position_bias_table.normal_()
    before = m.blocks[0].attn.relative_position_bias_table.detach().double().numpy().copy()
    m.set_input_size((32, 36))
    after = m.blocks[0].attn.relative_position_bias_table.detach().double().numpy()
    np.testing.assert_allclose(after, scipy_resize(before, (5, 7), (8, 9)), rtol=0, atol=1e-5)
    assert m(torch.randn(1, 3, 32, 36)).shape == (1, 16)


# ----------------------------------------------------------------------------------- absolute position resize

def hand_resize_pos(pe: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Official `interpolate_pos_embed`: CLS kept, the patch grid resized bicubically (align_corners=False)."""
    grid = pe[:, 1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], -1)], dim=1)


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((3, 5), (6, 4)), ((6, 6), (4, 4))])
def test_abs_pos_embed_resize_matches_timm_and_by_hand(src, dst):
    from beitv2.models.relpos import resize_pos_embed

    pe = torch.randn(1, 1 + src[0] * src[1], 8, generator=torch.Generator().manual_seed(6))
    got = resize_pos_embed(pe, src, dst)
    timm_ref = resample_abs_pos_embed(pe, new_size=list(dst), old_size=list(src), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(got, timm_ref)
    torch.testing.assert_close(got, hand_resize_pos(pe, src, dst), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, 0], pe[:, 0])


def test_model_set_input_size_resizes_abs_pos_embed_by_hand():
    torch.manual_seed(7)
    m = BEiTViT(ViTConfig(img_size=(12, 20), patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          use_abs_pos_emb=True, use_shared_rel_pos_bias=False))
    before = m.pos_embed.detach().clone()
    m.set_input_size((24, 16))
    torch.testing.assert_close(m.pos_embed.detach(), hand_resize_pos(before, (3, 5), (6, 4)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Mixup / CutMix

def _smooth_one_hot(y: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    off = smoothing / n
    return torch.full((len(y), n), off).scatter_(1, y[:, None], 1 - smoothing + off)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_finetune_mixup_cutmix_targets_match_their_definitions(kind):
    from beitv2.commands.finetune import FinetuneAugConfig, criterion_and_mixup

    aug = FinetuneAugConfig(mixup=0.8 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0,
                            smoothing=0.1)
    criterion, mixup = criterion_and_mixup(aug, num_classes=5)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2, 4])
    np.random.seed(0)  # timm draws lambda from numpy
    xm, t = mixup(x.clone(), y)
    flipped = x.flip(0)
    if kind == "mixup":
        # x_mixed = lam x + (1 - lam) x_flipped: solve for lam per pixel, one value for the batch
        lam = ((xm - flipped) / (x - flipped)).flatten()
        lam = float(lam.median())
        torch.testing.assert_close(xm, lam * x + (1 - lam) * flipped, rtol=1e-5, atol=1e-5)
    else:
        # a box of every image comes from the flipped batch; lam = 1 - its area fraction
        from_other = ~torch.isclose(xm, x) & torch.isclose(xm, flipped)
        box = from_other[0, 0]
        assert box.any() and torch.equal(from_other, box.expand_as(from_other))
        lam = 1.0 - float(box.float().mean())
    assert 0.0 < lam < 1.0
    ref = lam * _smooth_one_hot(y, 5, 0.1) + (1 - lam) * _smooth_one_hot(y.flip(0), 5, 0.1)
    torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-6)
    logits = torch.randn(4, 5, generator=g)
    torch.testing.assert_close(criterion(logits, t), (-t * logits.log_softmax(-1)).sum(-1).mean())


def test_finetune_without_mixup_uses_label_smoothing_by_definition():
    from beitv2.commands.finetune import FinetuneAugConfig, criterion_and_mixup

    criterion, mixup = criterion_and_mixup(FinetuneAugConfig(mixup=0.0, cutmix=0.0, smoothing=0.2), num_classes=4)
    assert mixup is None
    logits, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 1, 2, 3, 0, 1])
    ref = (-_smooth_one_hot(y, 4, 0.2) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(criterion(logits, y), ref)


# ------------------------------------------------------------------------------------------------------- EMA

def test_finetune_ema_update_is_decay_times_old_plus_rest_times_new():
    from beitv2.eval.finetune import WithEMA

    torch.manual_seed(10)
    net = BEiTViT(ViTConfig(img_size=(8,), patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3))
    model = WithEMA(net, decay=0.75)
    ema0 = {k: v.clone() for k, v in model.ema.module.state_dict().items()}
    assert all(torch.equal(ema0[k], v) for k, v in net.state_dict().items())  # starts as a copy
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        old = {k: v.clone() for k, v in model.ema.module.state_dict().items()}
        model.update_ema()
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(model.ema.module.state_dict()[k], 0.75 * old[k] + 0.25 * v,
                                           rtol=1e-6, atol=1e-6, msg=f"{k} at update {step}")
    assert not any(p.requires_grad for p in model.ema.parameters())
