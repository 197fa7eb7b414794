"""Teacher adapters built from tiny random models saved to disk or to a Hugging Face cache (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tr

from beitv2.cli import main
from beitv2.config import ConfigError
from beitv2.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from beitv2.teachers import Teacher, TeacherConfig, build_teacher, infer_grid

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 16}


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _hf(path, grid=(2, 2), **kw) -> Teacher:
    kw = {"bf16": False, **kw}
    return build_teacher(TeacherConfig(kind="hf", name_or_path=str(path), local_files_only=True, **kw), grid)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clip")
    model = tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(projection_dim=24, **TINY)).eval()
    model.save_pretrained(d)
    return d, model


def test_clip_patch_tokens_post_layernorm_and_projection(clip_dir):
    path, model = clip_dir
    teacher = _hf(path)
    assert teacher.feature_dim == 24 and teacher.input_size == (32, 32)
    assert teacher.mean == CLIP_MEAN and teacher.std == CLIP_STD
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the official target: ln_post(all tokens)[:, 1:] @ proj, on CLIP-normalised input
        hidden = model.vision_model(pixel_values=_norm(x, CLIP_MEAN, CLIP_STD)).last_hidden_state
        ref = model.visual_projection(model.vision_model.post_layernorm(hidden)[:, 1:])
    out = teacher(x)
    assert out.shape == (2, 4, 24)
    assert torch.allclose(out, ref, atol=1e-5)
    bf16 = _hf(path, bf16=True)(x)
    assert bf16.dtype == torch.float32 and F.cosine_similarity(bf16, ref, dim=-1).min() > 0.95


def test_teacher_is_frozen_and_stays_in_eval(clip_dir):
    teacher = _hf(clip_dir[0])
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert teacher(x).grad_fn is None


def test_resize_normalisation_override_and_grid_resampling(clip_dir):
    path, model = clip_dir
    teacher = _hf(path, grid=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 64, 64)  # the tokenizer view is larger than the teacher's 32 px
    small = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=_norm(small, (0.5,) * 3, (0.25,) * 3)).last_hidden_state
        ref = model.visual_projection(model.vision_model.post_layernorm(hidden)[:, 1:])  # [2, 2*2, 24]
    grid = ref.transpose(1, 2).reshape(2, 24, 2, 2)
    up = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    out = teacher(x)
    assert out.shape == (2, 16, 24)
    assert torch.allclose(out, up, atol=1e-5)
    assert teacher(x[:, :1]).shape == (2, 16, 24)  # a grayscale view is repeated to 3 channels


@pytest.mark.parametrize("typed", [True, False])
def test_processor_config_gives_normalisation(tmp_path, typed):
    """Read through AutoImageProcessor (typed file) or the family's processor class (a lone vision tower)."""
    model = tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(projection_dim=8, **TINY))
    model.save_pretrained(tmp_path)
    pp = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1], "crop_size": {"height": 48, "width": 48},
          "do_center_crop": True}
    if typed:
        pp["image_processor_type"] = "CLIPImageProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pp))
    teacher = _hf(tmp_path)
    assert teacher.mean == (0.1, 0.2, 0.3) and teacher.std == (0.3, 0.2, 0.1) and teacher.input_size == (48, 48)
    assert teacher(torch.rand(1, 3, 32, 32)).shape == (1, 4, 8)  # 3x3 CLIP grid resampled to 2x2


@pytest.mark.parametrize("family", ["vit", "dinov2", "dinov2_registers", "siglip"])
def test_hf_vit_dinov2_siglip(tmp_path, family):
    torch.manual_seed(0)
    if family == "vit":
        model = tr.ViTModel(tr.ViTConfig(**TINY), add_pooling_layer=False)
        prefix, mean, std = 1, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    elif family == "dinov2":
        model, prefix = tr.Dinov2Model(tr.Dinov2Config(**TINY)), 1
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    elif family == "dinov2_registers":
        model, prefix = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(num_register_tokens=2, **TINY)), 3
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        model, prefix, mean, std = tr.SiglipVisionModel(tr.SiglipVisionConfig(**TINY)), 0, (0.5,) * 3, (0.5,) * 3
    model.eval().save_pretrained(tmp_path)
    teacher = _hf(tmp_path)
    assert teacher.num_prefix_tokens == prefix and teacher.mean == tuple(mean) and teacher.feature_dim == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # last_hidden_state is after the final layernorm in all three families
        ref = model(pixel_values=_norm(x, mean, std)).last_hidden_state[:, prefix:]
    assert ref.shape == (2, 4, 32)
    assert torch.allclose(teacher(x), ref, atol=1e-5)


def test_timm_teacher_with_checkpoint(tmp_path):
    import timm

    kwargs = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **kwargs).eval()
    torch.save(source.state_dict(), tmp_path / "w.pth")  # with a classifier head, dropped on load
    cfg = TeacherConfig(kind="timm", name_or_path="vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.pth"),
                        model_kwargs=kwargs, bf16=False)
    teacher = build_teacher(cfg, (4, 4))
    assert teacher.input_size == (32, 32) and teacher.feature_dim == 32 and teacher.num_prefix_tokens == 1
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = source.forward_features(_norm(x, teacher.mean, teacher.std))[:, 1:]
    grid = ref.transpose(1, 2).reshape(2, 32, 2, 2)
    up = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(teacher(x), up, atol=1e-5)


def test_open_clip_local_dir_tokens_match_official_target(tmp_path):
    import open_clip

    cfg = {"model_cfg": {"embed_dim": 24,
                         "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
                         "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    teacher = build_teacher(TeacherConfig(kind="open_clip", name_or_path=f"local-dir:{tmp_path}", bf16=False), (2, 2))
    assert teacher.feature_dim == 24 and teacher.mean == CLIP_MEAN
    assert not hasattr(teacher, "transformer")  # the text tower is not kept
    x = torch.rand(2, 3, 32, 32)
    v = model.visual
    with torch.no_grad():
        h = v.transformer(v._embeds(_norm(x, CLIP_MEAN, CLIP_STD)))
        ref = v.ln_post(h)[:, 1:] @ v.proj
    assert torch.allclose(teacher(x), ref, atol=1e-5)


def test_beitv2_checkpoint_teacher(tmp_path):
    from beitv2.checkpoint import save_model
    from beitv2.models.backbone import BEiTViT, ViTConfig

    cfg = ViTConfig(img_size=(16,), patch_size=8, embed_dim=32, depth=2, num_heads=2, use_mean_pooling=True)
    torch.manual_seed(0)
    model = BEiTViT(cfg).eval()
    save_model(tmp_path / "vit.safetensors", model, config=cfg)
    teacher = build_teacher(TeacherConfig(kind="beitv2", name_or_path=str(tmp_path / "vit.safetensors"),
                                          bf16=False), (2, 2))
    assert teacher.input_size == (16, 16) and teacher.feature_dim == 32
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        tokens, _ = model.forward_features(_norm(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
        ref = model.fc_norm(tokens[:, 1:])
    assert torch.allclose(teacher(x), ref, atol=1e-5)


def test_config_validation_and_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher\.kind"):
        TeacherConfig(kind="keras").validate("teacher.")
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint: file not found"):
        TeacherConfig(kind="timm", name_or_path="vit_tiny_patch16_224", checkpoint="/nope.pth").validate("teacher.")
    with pytest.raises(ConfigError, match=r"^teacher\.mean"):
        TeacherConfig(mean=(0.5,), std=(0.5, 0.5)).validate("teacher.")
    with pytest.raises(ConfigError, match=r"^teacher\.name_or_path: directory not found"):
        TeacherConfig(kind="hf", name_or_path=str(tmp_path / "missing")).validate("teacher.")
    with pytest.raises(ConfigError, match=r"^teacher\.name_or_path: cannot build a hf teacher"):
        build_teacher(TeacherConfig(kind="hf", name_or_path=str(tmp_path), local_files_only=True), (2, 2))
    assert infer_grid(6, (32, 48)) == (2, 3)
    with pytest.raises(ValueError, match="cannot lay out"):
        infer_grid(7, (32, 32))


def _tiny_timm_net(tmp_path, seed=0):
    from beitv2.checkpoint import save_model
    from beitv2.models.timm_net import TimmNet, TimmNetConfig

    torch.manual_seed(seed)
    net = TimmNet(TimmNetConfig(name="resnet10t", num_classes=10, in_chans=1, img_size=56, mean=(0.45,),
                                std=(0.23,), model_kwargs={"channels": [8, 8, 16, 16], "output_stride": 8}))
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = save_model(tmp_path / "cnn.safetensors", net.eval())
    return net, path


def test_timm_net_file_is_a_teacher_with_its_own_input_contract(tmp_path):
    """A CNN trained here (kind 'timm') serves as a `beitv2` teacher: its 7x7 last feature map, computed from the
    28 px view resized to 56 px and normalised with its own statistics, by hand with timm directly."""
    import timm

    from beitv2.checkpoint import load_model, load_state_dict

    net, path = _tiny_timm_net(tmp_path)
    loaded, kind, _ = load_model(path)
    assert kind == "timm" and loaded.config.img_size == 56
    x = torch.rand(3, 1, 28, 28)
    ref_net = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1, channels=(8, 8, 16, 16),
                                output_stride=8)
    ref_net.load_state_dict({k[len("net."):]: v for k, v in load_state_dict(path).items()})
    ref_net.eval()
    big = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        fmap = ref_net.forward_features((big - 0.45) / 0.23)  # [3, 16, 7, 7]
        logits = ref_net((big - 0.45) / 0.23)
    torch.testing.assert_close(loaded(x), logits, rtol=1e-5, atol=1e-5)
    teacher = build_teacher(TeacherConfig(kind="beitv2", name_or_path=str(path), bf16=False), (7, 7))
    assert teacher.feature_dim == 16 and teacher.input_size == (56, 56)
    feats = teacher(x)
    torch.testing.assert_close(feats, fmap.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # layer-normed per patch: zero mean, unit variance over the channels of every patch
    ln = build_teacher(TeacherConfig(kind="beitv2", name_or_path=str(path), bf16=False, feature_norm="layernorm"),
                       (7, 7))(x)
    raw = fmap.flatten(2).transpose(1, 2)
    by_hand = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln, by_hand, rtol=1e-4, atol=1e-4)


def test_feature_norm_is_validated():
    with pytest.raises(ConfigError, match="teacher.feature_norm"):
        TeacherConfig(kind="beitv2", name_or_path=".", feature_norm="batchnorm").validate()


# ------------------------------------------------------------- weights by name: the hub cache, or a refusal

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_TINY = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_hub_cache(cache, repo_id: str, files: dict[str, bytes], commit: str = "0123456789abcdef" * 2 + "01234567"):
    """A repository snapshot laid out as huggingface_hub caches it: ``models--ORG--NAME/refs/main`` (the commit)
    and ``models--ORG--NAME/snapshots/<commit>/<files>``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_timm_teacher_by_name_reads_the_offline_hub_cache_and_a_name_missing_there_is_refused(tmp_path):
    """`pretrained=True` for a timm name: the weights timm names for it (its pretrained cfg's hf_hub_id) come from
    the Hugging Face cache with HF_HUB_CACHE and HF_HUB_OFFLINE=1, as a user without network has them. A name whose
    weights are not in that cache stops `train-tokenizer` with one line (exit 2, no traceback) before any work.
    One child process for both: huggingface_hub reads these variables when it is imported."""
    import timm
    from PIL import Image
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    source = timm.create_model(TIMM_NAME, pretrained=False, **TIMM_TINY)  # the pretrained cfg's 1000-class head
    pcfg = source.pretrained_cfg
    repo_id = pcfg["hf_hub_id"]
    assert repo_id.startswith("timm/") and pcfg["num_classes"] == 1000
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, tmp_path / "w.safetensors")
    config = {"architecture": TIMM_NAME, "num_classes": 1000, "pretrained_cfg": {
        k: v for k, v in pcfg.items() if k in ("tag", "input_size", "mean", "std", "classifier", "num_classes")}}
    write_hub_cache(tmp_path / "hub", repo_id, {"model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
                                               "config.json": json.dumps(config).encode()})
    (tmp_path / "imgs" / "c").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / "imgs" / "c" / f"{i}.png")
    uncached = "deit_tiny_patch16_224"  # its weights (another hf_hub_id) are not in the cache
    script = textwrap.dedent(f"""
        import sys
        from safetensors.torch import save_file
        from beitv2.cli import main
        from beitv2.teachers import TeacherConfig, build_teacher
        t = build_teacher(TeacherConfig(kind="timm", name_or_path={TIMM_NAME!r}, model_kwargs={TIMM_TINY!r},
                                        bf16=False), (2, 2))
        out = {str(tmp_path / "teacher.safetensors")!r}
        save_file({{k: v.contiguous() for k, v in t.model.state_dict().items()}}, out)
        sys.exit(main(["train-tokenizer", "--data.kind", "folder", "--data.path", {str(tmp_path / "imgs")!r},
                       "--teacher.kind", "timm", "--teacher.name_or_path", {uncached!r},
                       "--teacher.model_kwargs", {json.dumps(TIMM_TINY)!r},
                       "--train.output_dir", {str(tmp_path / "run")!r}]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    got = load_file(tmp_path / "teacher.safetensors")
    want = {k: v for k, v in weights.items() if not k.startswith("head.")}  # num_classes=0: timm drops the head
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    fresh = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_TINY)  # random: different
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], got["blocks.0.attn.qkv.weight"])
    # the name without cached weights
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if "configuration error" in x]
    assert line.startswith("beitv2 train-tokenizer: configuration error: teacher.name_or_path: cannot build a timm "
                           f"teacher from '{uncached}': timm could not load pretrained weights for {uncached}")
    assert line.endswith("give teacher.checkpoint, or teacher.random_init true for random weights")
    assert not (tmp_path / "run").exists()


def test_open_clip_teacher_without_weights_is_refused_unless_random_init(tmp_path, capsys):
    """An open_clip architecture name alone has no weights (open_clip would initialise it randomly, with only a log
    warning): the CLI refuses it on one line, exit 2, before any work; `--teacher.random_init true` trains with it."""
    import open_clip
    from test_train_commands import FAST, TRAIN, VQKD, make_folder, write_yaml

    tiny = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "beitv2-test-tiny-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "arch")  # an architecture name, as "ViT-B-16" is one
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "tok.yaml", {
        "tokenizer": {"vqkd": {**VQKD, "teacher_dim": 24}},
        "teacher": {"kind": "open_clip", "name_or_path": "beitv2-test-tiny-clip", "bf16": False},
        "data": {**FAST, "kind": "folder", "path": str(make_folder(tmp_path / "imgs", n_per_class=8))},
        "train": {**TRAIN, "epochs": 1, "output_dir": str(out)}})
    for name in ("ViT-B-16", "beitv2-test-tiny-clip"):
        assert main(["train-tokenizer", "--config", str(cfg), "--teacher.name_or_path", name]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"beitv2 train-tokenizer: configuration error: teacher.name_or_path: open_clip model {name!r} has no "
            "weights: give teacher.checkpoint, an 'hf-hub:ID' or 'local-dir:PATH' name, or teacher.random_init true "
            "for random weights"]
    assert not out.exists()
    assert main(["train-tokenizer", "--config", str(cfg), "--teacher.random_init", "true"]) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert len(steps) == 2 and all(-1 <= s["teacher_cos"] <= 1 for s in steps)  # 16 images / 8


# ---------------------------------------------------------------------------------- feature-grid resampling
# Independent references for `F.interpolate(mode="bicubic", align_corners=False)`: PyTorch's plain bicubic is the
# cubic convolution of Keys (a = -0.75) sampled at (o + 0.5) * in / out - 0.5 with border taps clamped, written out
# below; its antialiased form is Pillow's BICUBIC filter (a = -0.5, support widened by the reduction factor), which
# PyTorch ported, so Pillow itself is the reference there.

def _keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bicubic resampling (align_corners=False, no antialiasing)."""
    import math

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k, weight in zip((x0 - 1, x0, x0 + 1, x0 + 2), (_keys_cubic(t + 1), _keys_cubic(t), _keys_cubic(1 - t),
                                                            _keys_cubic(2 - t))):
            w[o, min(max(k, 0), n_in - 1)] += weight
    return w


def _pillow_bicubic(fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, D, h, w] -> [B, D, *size], each map resized by Pillow's (antialiasing) BICUBIC in float mode."""
    from PIL import Image

    out = torch.empty(*fmap.shape[:2], *size)
    for b in range(fmap.shape[0]):
        for d in range(fmap.shape[1]):
            img = Image.fromarray(fmap[b, d].numpy().astype("float32"))
            out[b, d] = torch.from_numpy(np.array(img.resize((size[1], size[0]), Image.Resampling.BICUBIC)))
    return out


class _FixedTokens(Teacher):
    """A teacher whose `encode` returns given tokens on its own grid: `resample` is all that runs after it."""

    def __init__(self, tokens: torch.Tensor, input_size, grid):
        super().__init__(grid, input_size, mean=(0.5,), std=(0.5,), feature_dim=tokens.shape[-1], bf16=False)
        self.tokens = tokens

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[-2:]) == self.input_size
        return self.tokens[: x.shape[0]]


@pytest.mark.parametrize("own, input_size, grid", [
    ((3, 5), (48, 80), (6, 10)),  # larger on both sides: plain bicubic
    ((3, 5), (48, 80), (6, 4)),  # taller but narrower: a reduction in one direction, so antialiased
    ((6, 4), (96, 64), (3, 2)),  # smaller on both sides: antialiased
    ((3, 5), (48, 80), (2, 7)),  # shorter but wider: antialiased
])
def test_teacher_features_are_resampled_to_non_square_tokenizer_grids(own, input_size, grid):
    """Row-major tokens of an h x w teacher grid become the tokenizer's H x W grid: each feature channel resized as
    an image, rows staying rows (a transposed reshape or size would shuffle or stretch them on non-square grids)."""
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, *own, generator=g) * 4  # trained-scale features
    tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major as every teacher returns them
    teacher = _FixedTokens(tokens, input_size, grid)
    shrink = grid[0] < own[0] or grid[1] < own[1]
    if shrink:
        expected = _pillow_bicubic(fmap, grid)
    else:
        wh, ww = _bicubic_matrix(own[0], grid[0]), _bicubic_matrix(own[1], grid[1])
        expected = (wh @ fmap.double() @ ww.t()).float()
    expected = expected.flatten(2).transpose(1, 2)
    out = teacher(torch.rand(2, 1, 40, 24))  # the tokenizer's view at its own size, resized to input_size
    assert out.shape == (2, grid[0] * grid[1], 3)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_teacher_tokens_pass_unchanged_when_the_grids_agree():
    tokens = torch.randn(1, 15, 4)
    teacher = _FixedTokens(tokens, (48, 80), (3, 5))
    assert torch.equal(teacher(torch.rand(1, 1, 48, 80)), tokens)
    assert infer_grid(15, (48, 80)) == (3, 5) and infer_grid(15, (80, 48)) == (5, 3)
