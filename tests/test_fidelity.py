"""Behaviour that must match the official microsoft/unilm code (or differ from it only by a named option)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import tiny_mim, tiny_vit
from PIL import Image
from torch.utils.data import DataLoader

from beitv2.checkpoint import load_state_dict, save_model
from beitv2.cli import main
from beitv2.data import collate_skip_bad
from beitv2.data.samples import TransformDataset
from beitv2.engine.sampler import ResumableSampler
from beitv2.models.backbone import BEiTViT
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig

COMMON = ["--train.device", "cpu", "--train.progress", "false", "--train.tensorboard", "false"]


class Constant:
    """The same image at every index, so a sample differs from another only by its random draws."""

    labels = np.zeros(16, dtype=np.int64)

    def __init__(self, n: int = 16):
        rng = np.random.default_rng(0)
        self.img = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.img, 0


def _probe(img):
    """What timm's transforms draw from: Python's `random`, numpy's global generator (and torch)."""
    return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def _rank_batches(ds, rank: int, workers: int) -> list[dict]:
    sampler = ResumableSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
    # the loader generator as the old trainer seeded it: train.seed on every rank (the worst case)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator().manual_seed(0))
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_draw_different_augmentations(workers):
    """Every RNG a fine-tuning transform uses is seeded per sample from (seed, epoch, index): two ranks at the same
    batch slot draw different values (and so different RandAugment ops), the same index draws the same values
    whichever rank or worker makes it, and the caller's RNG streams are left untouched."""
    ds = TransformDataset(Constant(), _probe, seed=0)
    r0, r1 = _rank_batches(ds, 0, workers), _rank_batches(ds, 1, workers)
    for b0, b1 in zip(r0, r1):
        for x0, x1 in zip(b0["image"], b1["image"]):
            assert (x0 != x1).all(), (x0, x1)  # python, numpy and torch draws all differ between the ranks
        for i, x in zip(b0["index"].tolist(), b0["image"]):
            assert torch.equal(ds[i]["image"], x)  # a function of the index alone
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ds[3]
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])


def test_randaugment_differs_between_ranks_at_the_same_slot():
    """The fine-tuning transform itself (RandAugment + RandomResizedCrop, which draw from Python's `random` only
    with flips and erasing off) gives different images on two ranks: before per-sample seeding of `random` both
    ranks' workers applied the same ops to the same slot."""
    from beitv2.commands.finetune import FinetuneAugConfig, train_transform

    tf = train_transform(FinetuneAugConfig(hflip=0.0, reprob=0.0), (16, 16), 3, "imagenet")
    ds = TransformDataset(Constant(), tf, seed=0)
    r0, r1 = _rank_batches(ds, 0, 2), _rank_batches(ds, 1, 2)
    same = sum(torch.equal(x0, x1) for b0, b1 in zip(r0, r1) for x0, x1 in zip(b0["image"], b1["image"]))
    assert same == 0


def _folder(root: Path, n_per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_finetune_resumes_bitwise_with_randaugment_and_mixup(tmp_path):
    """An interrupted fine-tuning run (RandAugment, random erasing, Mixup/CutMix, drop path, two data-loader
    workers) resumed from its mid-epoch checkpoint ends with the uninterrupted run's weights, bit for bit."""
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "mim.safetensors", tiny_mim())
    data = _folder(tmp_path / "imgs")
    full, cut = tmp_path / "full", tmp_path / "cut"

    def args(out: Path) -> list[str]:
        return ["finetune", "--model.checkpoint", str(ckpt), "--data.path", str(data), "--data.num_workers", "2",
                "--aug.rand_aug", "rand-m9-mstd0.5-inc1", "--aug.mixup", "0.8", "--aug.cutmix", "1.0",
                "--model.drop_path", "0.1", "--train.epochs", "2", "--train.batch_size", "4",
                "--optim.warmup_epochs", "1", "--train.output_dir", str(out), *COMMON]

    assert main(args(full)) == 0
    assert main([*args(cut), "--train.stop_after_steps", "3"]) == 0
    assert not (cut / "model.safetensors").exists()
    assert main(args(cut)) == 0
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------- BEiT v1: DALL-E's dVAE

def _cells(n: int) -> torch.Tensor:
    """32 px images of random colours constant over each 8x8 cell of the 4x4 code grid."""
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4), scale_factor=8, mode="nearest")


def _dalle_files(tmp_path: Path) -> tuple[Path, Path, object, object]:
    """Random-init modules of the `dall_e` package saved as its released files are (``torch.save(module)``). The
    encoder's output convolution is re-drawn on standardised features so that the argmax codes of `_cells` images
    spread over many entries (a fresh init gives a handful); the decoder's weights are perturbed."""
    from dall_e import Decoder, Encoder, map_pixels

    torch.manual_seed(0)
    enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    with torch.no_grad():
        feats = torch.relu(enc.blocks[:-1](map_pixels(_cells(8))))
        mu, sd = feats.mean((0, 2, 3)), feats.std((0, 2, 3))
        w = torch.randn(512, feats.shape[1]) / (sd + 1e-3)
        enc.blocks.output.conv.w.copy_(w[:, :, None, None])
        enc.blocks.output.conv.b.copy_(-(w @ mu))
        for p in dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    return tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", enc, dec


def test_dalle_files_load_without_dall_e_and_give_identical_codes(tmp_path):
    """The DALL-E encoder/decoder files, read by the restricted unpickler into the library's dVAE, tokenize (and
    decode) exactly as the `dall_e` package's own modules; DALL-E's pixel mapping (eps 0.1) is used."""
    from dall_e import map_pixels, unmap_pixels

    from beitv2.interop.dalle import load_dalle

    enc_path, dec_path, enc, dec = _dalle_files(tmp_path)
    model = load_dalle(enc_path, dec_path, img_size=32)
    c = model.config
    assert c.pixel_map == "dall-e" and c.logit_laplace_eps == 0.1
    assert (c.hidden_dim, c.code_dim, c.vocab_size, model.grid_size) == (64, 32, 512, (4, 4))
    x = _cells(6)
    with torch.no_grad():
        ref = enc(map_pixels(x)).argmax(1).flatten(1)
    ours = model.tokenize(x)
    assert ref.unique().numel() > 20
    assert torch.equal(ours, ref)
    with torch.no_grad():
        z = torch.nn.functional.one_hot(ref.view(6, 4, 4), 512).permute(0, 3, 1, 2).float()
        ref_img = unmap_pixels(torch.sigmoid(dec(z).float()[:, :3]))
    torch.testing.assert_close(model.decode(ref), ref_img, rtol=0, atol=1e-5)


def test_dalle_unpickler_refuses_other_globals(tmp_path):
    """A pickle naming anything outside the allow-list (here ``os.system``) is refused, and nothing runs."""
    import os
    import pickle

    from beitv2.interop.dalle import read_torch_pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pkl")
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        read_torch_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    torch.save({"f": print}, tmp_path / "builtin.pkl")
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_torch_pickle(tmp_path / "builtin.pkl")
    # plain tensors in a dict load fine
    torch.save({"w": torch.arange(6.0).view(2, 3)[:, 1:]}, tmp_path / "ok.pkl")
    assert torch.equal(read_torch_pickle(tmp_path / "ok.pkl")["w"], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))


def test_convert_and_pretrain_accept_dalle_files(tmp_path):
    """`beitv2 convert --from dalle` writes a dvae model file with the same codes; `beitv2 pretrain` trains BEiT v1
    (no patch aggregation, v1 masking, lanczos second view) on DALL-E's encoder.pkl directly."""
    from beitv2.checkpoint import load_model

    enc_path, dec_path, enc, _ = _dalle_files(tmp_path)
    out = tmp_path / "dalle.safetensors"
    assert main(["convert", "--from", "dalle", "--to", "beitv2", "--img-size", "32", "--decoder", str(dec_path),
                 str(enc_path), str(out)]) == 0
    model, kind, cfg = load_model(out)
    x = _cells(2)
    assert kind == "dvae" and cfg["pixel_map"] == "dall-e"
    with torch.no_grad():
        assert torch.equal(model.tokenize(x), enc((1 - 0.2) * x + 0.1).argmax(1).flatten(1))
    assert main(["convert", "--from", "dalle", "--to", "hf", str(enc_path), str(tmp_path / "hf")]) == 2

    data = _folder(tmp_path / "imgs", n_per_class=4)
    run = tmp_path / "pt"
    args = ["pretrain", "--tokenizer.checkpoint", str(enc_path), "--tokenizer.dalle_img_size", "32",
            "--model.backbone.img_size", "16", "--model.backbone.patch_size", "4", "--model.backbone.embed_dim", "32",
            "--model.backbone.depth", "2", "--model.backbone.num_heads", "2", "--model.vocab_size", "512",
            "--model.patch_aggregation", "false", "--mask.num_masking_patches", "6", "--mask.min_num_patches", "2",
            "--mask.top_up", "false", "--aug.second_interpolation", "lanczos", "--data.path", str(data),
            "--data.num_workers", "0", "--train.epochs", "1", "--train.batch_size", "4", "--train.log_every_steps",
            "1", "--train.output_dir", str(run), *COMMON]
    assert main(args) == 0
    model, kind, cfg = load_model(run / "model.safetensors")
    assert kind == "mim" and not cfg["patch_aggregation"]
    assert main([*args[:2], str(dec_path), *args[3:]]) == 2  # the decoder is not a tokenizer


def test_v1_masking_keeps_the_count_the_blocks_reached():
    from beitv2.masking import BlockwiseMaskGenerator

    v2 = BlockwiseMaskGenerator(14, 75, 16)
    v1 = BlockwiseMaskGenerator(14, 75, 16, top_up=False)
    c2 = [int(v2(np.random.default_rng(i)).sum()) for i in range(200)]
    c1 = [int(v1(np.random.default_rng(i)).sum()) for i in range(200)]
    assert set(c2) == {75}
    assert max(c1) == 75 and min(c1) < 75 and 20 < sum(c < 75 for c in c1) < 120  # about a third stop short


# ------------------------------------------------------------------------------------------- weight-decay groups

def _official_decays(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    """The official `get_parameter_groups` rule: no decay for 1-d params, biases and the model's skip list."""
    return not (p.ndim <= 1 or name.endswith(".bias") or name in skip)


def _decayed(groups: list[dict]) -> dict[str, bool]:
    return {n: g["apply_wd"] for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("preset", ["beitv2_base_pt1k_1600e", "beitv2_base_pt1k_300e", "beitv2_large_pt1k",
                                    "beit_v1_base_dalle", "vqkd_base_clip_in1k", "(pretrain defaults)",
                                    "(finetune defaults)"])
def test_official_presets_reproduce_the_official_weight_decay_groups(preset):
    """Pre-training decays mask_token and the shared relative position table; fine-tuning decays the per-block
    tables; VQ-KD exempts only 1-d params, biases and the encoder's/decoder's cls_token and pos_embed."""
    from beitv2.commands._training import load_recipe
    from beitv2.commands.finetune import FinetuneConfig
    from beitv2.commands.pretrain import PretrainConfig
    from beitv2.commands.train_tokenizer import TrainTokenizerConfig
    from beitv2.config import from_dict
    from beitv2.engine.optim import param_groups
    from beitv2.eval.finetune import finetune_config, layer_id_fn
    from beitv2.models.vqkd import VQKD

    with torch.device("meta"):
        if preset.startswith("vqkd"):
            cfg = from_dict(TrainTokenizerConfig, load_recipe(preset))
            model = VQKD(cfg.tokenizer.vqkd)
            skip = {f"{p}.{n}" for p in ("encoder", "decoder") for n in ("cls_token", "pos_embed")}
            groups = param_groups(model, cfg.optim)
        elif preset == "(finetune defaults)":
            cfg = FinetuneConfig()
            src = PretrainConfig().model.backbone
            model = BEiTViT(finetune_config(src, cfg.model, 1000))
            skip = {"pos_embed", "cls_token"}
            groups = param_groups(model, cfg.optim, layer_id_fn(model.depth), model.depth + 2)
            assert _decayed(groups)["blocks.0.attn.relative_position_bias_table"]
        else:
            cfg = PretrainConfig() if preset.startswith("(") else from_dict(PretrainConfig, load_recipe(preset))
            model = BEiTv2ForMIM(cfg.model)
            skip = {"pos_embed", "cls_token"}
            groups = param_groups(model, cfg.optim)
            assert _decayed(groups)["mask_token"] and _decayed(groups)["rel_pos_bias.relative_position_bias_table"]
    expected = {n: _official_decays(n, p, skip) for n, p in model.named_parameters() if p.requires_grad}
    assert _decayed(groups) == expected


# --------------------------------------------------------------------------------------------- initialisation

def _kaiming_uniform_std(fan_in: int) -> float:
    """std of PyTorch's default Linear/Conv2d weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(3 * fan_in)


def test_patch_aggregation_blocks_keep_pytorch_default_init_then_the_rescale():
    """Official: `cls_pt_layers` are built after the model's `_init_weights`, so their Linear layers keep PyTorch's
    kaiming-uniform weights and non-zero uniform biases; only the sqrt(2l) rescale (l = early_layers + j + 1) is
    applied. The backbone's Linear weights and the patch embedding are truncated normal (0.02, cut at 1 std)."""
    torch.manual_seed(0)
    d, early = 192, 3
    cfg = MIMConfig(backbone=tiny_vit(img_size=(32,), embed_dim=d, depth=4, num_heads=3), vocab_size=64,
                    early_layers=early, head_layers=2)
    m = BEiTv2ForMIM(cfg)
    for j, blk in enumerate(m.cls_pt_layers):
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        assert fc1.weight.std().item() == pytest.approx(_kaiming_uniform_std(d), rel=0.03)
        assert fc1.weight.abs().max().item() > 0.9 / math.sqrt(d)  # uniform to the bound, not trunc-normal
        assert fc1.bias.abs().mean().item() > 0.2 / math.sqrt(d)  # non-zero biases
        l_id = early + j + 1
        assert fc2.weight.std().item() == pytest.approx(_kaiming_uniform_std(4 * d) / math.sqrt(2 * l_id), rel=0.03)
        assert blk.attn.proj.weight.std().item() == pytest.approx(_kaiming_uniform_std(d) / math.sqrt(2 * l_id),
                                                                  rel=0.05)
    for w in (m.blocks[0].mlp.fc1.weight, m.patch_embed.proj.weight, m.lm_head.weight):
        assert w.abs().max().item() <= 0.02 + 1e-7
        assert w.std().item() == pytest.approx(0.02 * 0.5396, rel=0.06)  # N(0, 0.02) truncated at +-1 std
    assert m.blocks[0].mlp.fc1.bias.abs().max() == 0 and m.patch_embed.proj.bias.abs().max() == 0
    # the other behaviour, by name
    m2 = BEiTv2ForMIM(MIMConfig(**{**cfg.__dict__, "cls_pt_init": "trunc_normal"}))
    assert m2.cls_pt_layers[0].mlp.fc1.weight.abs().max().item() <= 0.02 + 1e-7
    assert m2.cls_pt_layers[0].mlp.fc1.bias.abs().max() == 0


def test_vqkd_patch_embeddings_keep_pytorch_default_init():
    """Official VQ-KD encoder and decoder are the fine-tuning ViT, whose `_init_weights` has no Conv2d branch: the
    encoder's 16x16 and the decoder's 1x1 convolution over the 32-d codes keep kaiming-uniform weights and a
    non-zero bias (the decoder's is about 5x larger than trunc_normal(0.02) would give)."""
    from beitv2.models.quantizer import QuantizerConfig
    from beitv2.models.vqkd import VQKD, VQKDConfig, vqkd_encoder_config

    torch.manual_seed(0)
    v = VQKD(VQKDConfig(encoder=vqkd_encoder_config(img_size=(32,), patch_size=16, embed_dim=96, depth=1,
                                                    num_heads=2),
                        decoder_depth=1, quantizer=QuantizerConfig(num_codes=16, code_dim=32), teacher_dim=8))
    enc, dec = v.encoder.patch_embed.proj, v.decoder.patch_embed.proj
    assert enc.weight.std().item() == pytest.approx(_kaiming_uniform_std(3 * 16 * 16), rel=0.03)
    assert dec.weight.std().item() == pytest.approx(_kaiming_uniform_std(32), rel=0.05)
    assert dec.weight.std().item() > 4 * 0.02
    for conv, fan_in in ((enc, 768), (dec, 32)):
        assert conv.bias.abs().min() > 0 and conv.bias.abs().max() <= 1 / math.sqrt(fan_in)
    # the Linear layers stay trunc_normal(0.02), untruncated, zero bias
    fc1 = v.encoder.blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05) and fc1.bias.abs().max() == 0


# ---------------------------------------------------------------------------------------------------- recipes

# The official commands (beit2/PRETRAINING.md, beit2/TOKENIZER.md, beit2/get_started_for_image_classification.md),
# written out here independently of the presets.
OFFICIAL_PRETRAIN = {  # preset: (lr, warmup, epochs, betas, clip, drop path, layer scale, early layers, batch/GPU)
    "beitv2_base_pt1k_1600e": (1.5e-3, 10, 1600, (0.9, 0.999), 3.0, 0.1, 0.1, 9, 128),
    "beitv2_base_pt1k_300e": (1.5e-3, 10, 300, (0.9, 0.98), 3.0, 0.0, 0.1, 9, 128),
    "beitv2_large_pt1k": (1.5e-3, 10, 1600, (0.9, 0.999), 3.0, 0.1, 1e-5, 21, 32),
}
OFFICIAL_FINETUNE = {  # preset: (lr, epochs, layer decay, drop path, warmup epochs); more in test_recipes.py
    "beitv2_base_ft1k_pt1600e": (5e-4, 100, 0.6, 0.2, 20),
    "beitv2_base_ft1k_pt300e": (5e-4, 100, 0.65, 0.1, 20),
    "beitv2_large_ft1k_pt1600e": (2e-4, 50, 0.8, 0.2, 5),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PRETRAIN))
def test_pretrain_presets_match_the_official_commands(name):
    from beitv2.commands._training import load_recipe
    from beitv2.commands.pretrain import PretrainConfig
    from beitv2.config import from_dict

    c = from_dict(PretrainConfig, load_recipe(name))
    lr, warm, ep, betas, clip, dp, ls, early, bs = OFFICIAL_PRETRAIN[name]
    assert (c.optim.lr, c.optim.warmup_epochs, c.train.epochs, tuple(c.optim.betas), c.optim.clip_grad) == \
        (lr, warm, ep, betas, clip)
    b = c.model.backbone
    assert (b.drop_path_rate, b.init_values, c.model.early_layers, c.train.batch_size) == (dp, ls, early, bs)
    assert (c.optim.min_lr, c.optim.weight_decay, c.optim.eps, c.optim.official_no_decay) == (1e-5, 0.05, 1e-8, True)
    assert (c.model.head_layers, c.model.shared_lm_head, c.model.vocab_size, c.model.patch_aggregation) == \
        (2, True, 8192, True)
    assert (b.use_shared_rel_pos_bias, b.use_abs_pos_emb, b.drop_rate, b.patch_embed_init) == \
        (True, False, 0.0, "trunc_normal")
    assert (c.mask.num_masking_patches, c.mask.min_num_patches, c.mask.top_up) == (75, 16, True)
    assert (c.aug.min_crop_scale, c.aug.color_jitter, c.aug.second_interpolation, c.aug.normalize) == \
        (0.2, 0.4, "bicubic", "imagenet")
    assert c.model.cls_pt_init == "torch_default"


@pytest.mark.parametrize("name", sorted(OFFICIAL_FINETUNE))
def test_finetune_presets_match_the_official_commands(name):
    from beitv2.commands._training import load_recipe
    from beitv2.commands.finetune import FinetuneConfig
    from beitv2.config import from_dict

    c = from_dict(FinetuneConfig, load_recipe(name))
    assert (c.optim.lr, c.train.epochs, c.optim.layer_decay, c.model.drop_path, c.optim.warmup_epochs) == \
        OFFICIAL_FINETUNE[name]
    assert (c.aug.mixup, c.aug.cutmix, c.aug.smoothing, c.aug.rand_aug, c.aug.reprob) == \
        (0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1", 0.25)
    assert (c.optim.min_lr, c.optim.weight_decay, c.optim.official_no_decay) == (1e-6, 0.05, True)
    assert (c.model.head_init_scale, c.model.use_cls, c.model.rel_pos_bias, c.model.drop_rate) == \
        (0.001, False, True, 0.0)
    assert FinetuneConfig().optim.layer_decay == 0.65 and FinetuneConfig().model.drop_path == 0.1  # 300-epoch base


def test_vqkd_preset_matches_the_official_command():
    from beitv2.commands._training import load_recipe
    from beitv2.commands.train_tokenizer import TrainTokenizerConfig
    from beitv2.config import from_dict

    c = from_dict(TrainTokenizerConfig, load_recipe("vqkd_base_clip_in1k"))
    q = c.tokenizer.vqkd.quantizer
    assert (q.num_codes, q.code_dim, q.decay, q.kmeans_init, c.tokenizer.vqkd.decoder_depth) == \
        (8192, 32, 0.99, True, 3)
    o = c.optim
    assert (o.lr, o.lr_reference_batch, o.min_lr, o.warmup_epochs, tuple(o.betas), o.weight_decay, c.train.epochs,
            c.train.batch_size) == (5e-5, 128, 1e-5, 10, (0.9, 0.99), 1e-4, 100, 64)
    assert c.tokenizer.vqkd.encoder.patch_embed_init == "torch_default"


def test_official_drop_rate_and_the_head_dropout_are_separate_options():
    """Official ``drop_rate``: dropout after the position embedding, after the attention projection and after the
    MLP's fc2 (not after GELU); ours ``head_drop_rate``: on the pooled feature before the classifier."""
    m = BEiTViT(tiny_vit(drop_rate=0.3, head_drop_rate=0.2, num_classes=3, use_mean_pooling=True))
    assert m.pos_drop.p == 0.3 and m.head_drop.p == 0.2
    for blk in m.blocks:
        assert blk.attn.proj_drop.p == 0.3 and blk.mlp.drop2.p == 0.3 and isinstance(blk.mlp.drop1, torch.nn.Identity)
    plain = BEiTViT(tiny_vit(num_classes=3, use_mean_pooling=True))
    assert plain.pos_drop.p == 0.0 and plain.head_drop.p == 0.0 and plain.blocks[0].attn.proj_drop.p == 0.0
    x = torch.randn(2, 3, 16, 16)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    from beitv2.eval.finetune import FinetuneModelConfig, finetune_config

    cfg = finetune_config(tiny_vit(), FinetuneModelConfig(drop_rate=0.1, head_drop_rate=0.2), 3)
    assert (cfg.drop_rate, cfg.head_drop_rate) == (0.1, 0.2)


def test_small_images_use_the_official_random_crop_with_padding_and_no_eval_resize():
    from torchvision import transforms

    from beitv2.commands.finetune import FinetuneAugConfig, train_transform
    from beitv2.data.transforms import EvalTransform, to_tensor

    small = train_transform(FinetuneAugConfig(), (28, 28), 3, "imagenet")
    assert isinstance(small.transforms[0], transforms.RandomCrop) and small.transforms[0].padding == 4
    big = train_transform(FinetuneAugConfig(), (64, 64), 3, "imagenet")
    assert "RandomResizedCrop" in type(big.transforms[0]).__name__
    off = train_transform(FinetuneAugConfig(small_image_rule=False), (28, 28), 3, "imagenet")
    assert "RandomResizedCrop" in type(off.transforms[0]).__name__
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    ev = EvalTransform((28, 28), normalize="none", resize=False)
    assert torch.equal(ev.specs[0](ev(img)), to_tensor(img))  # no resize, no crop at the model's size
    resized = EvalTransform((28, 28), normalize="none")
    assert not torch.equal(resized.specs[0](resized(img)), to_tensor(img))  # 32 px resize + crop
