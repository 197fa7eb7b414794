"""The package's structure: one model registry, the trainer's hooks, and the import layers of docs/architecture.md."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from beitv2.checkpoint import load_model, save_model
from beitv2.config import opt
from beitv2.engine import OptimConfig, TrainConfig, Trainer, init_distributed, seed_everything
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.dvae import DiscreteVAE, dvae_tiny
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.models.presets import PRESETS, build_model, get_preset
from beitv2.models.quantizer import QuantizerConfig
from beitv2.models.registry import (
    ModelKind,
    backbone_config,
    backbone_state_dict,
    get_kind,
    kind_of,
    kinds,
    register,
)
from beitv2.models.vqkd import VQKD, VQKDConfig, vqkd_encoder_config
from beitv2.tasks import TrainTask

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "beitv2"


def tiny_vit(**kw) -> ViTConfig:
    return ViTConfig(**{"img_size": (16,), "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, **kw})


def tiny_models() -> dict[str, nn.Module]:
    return {
        "vit": BEiTViT(tiny_vit(num_classes=3)),
        "mim": BEiTv2ForMIM(MIMConfig(backbone=tiny_vit(), vocab_size=16, early_layers=1, head_layers=1)),
        "vqkd": VQKD(VQKDConfig(encoder=vqkd_encoder_config(img_size=(16,), patch_size=4, embed_dim=32, depth=2,
                                                            num_heads=2), decoder_depth=1,
                                quantizer=QuantizerConfig(num_codes=8, code_dim=4), teacher_dim=8)),
        "dvae": DiscreteVAE(dvae_tiny(img_size=16, in_chans=1)),
    }


# ------------------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("kind", ["vit", "mim", "vqkd", "dvae"])
def test_every_kind_saves_and_loads_through_the_registry(tmp_path, kind):
    model = tiny_models()[kind]
    assert kind_of(model).name == kind
    assert isinstance(model.config, get_kind(kind).config_class)
    path = save_model(tmp_path / "m.safetensors", model)  # kind and config come from the model
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "beitv2" and meta["kind"] == kind and json.loads(meta["config"])
    loaded, loaded_kind, _ = load_model(path)
    assert loaded_kind == kind and type(loaded) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mim_model_config_is_the_mim_config_and_cfg_its_backbone():
    mim = tiny_models()["mim"]
    assert isinstance(mim.config, MIMConfig) and mim.cfg is mim.config.backbone
    assert mim.mim_cfg is mim.config  # the former name still reads


@pytest.mark.parametrize("kind", ["vit", "mim", "vqkd"])
def test_backbone_of_every_kind_loads_strictly_into_a_vit(kind):
    model = tiny_models()[kind]
    vit = BEiTViT(backbone_config(model))
    state = backbone_state_dict(model)
    assert not any(k.startswith(BEiTv2ForMIM.pretrain_only_keys) for k in state)
    vit.load_state_dict(state, strict=True)
    x = torch.rand(2, vit.cfg.in_chans, 16, 16)
    src = model.encoder if kind == "vqkd" else model
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x)[0], src.forward_features(x)[0])


def test_dvae_has_no_backbone():
    with pytest.raises(ValueError, match="no ViT backbone"):
        backbone_config(tiny_models()["dvae"])


def test_one_preset_table_holds_every_kind():
    assert {get_preset(n)[0] for n in PRESETS} == {"vit", "mim", "vqkd", "dvae"}
    assert kind_of(build_model("dvae_tiny")).name == "dvae"
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("no_such_preset")


@dataclass
class ToyConfig:
    backbone: ViTConfig = field(default_factory=tiny_vit)
    classes: int = opt(5, "outputs")


class Toy(nn.Module):
    """A new kind, as a segmenter would be: a ViT under ``backbone.`` and its own head."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.backbone = BEiTViT(cfg.backbone)
        self.head = nn.Linear(cfg.backbone.embed_dim, cfg.classes)


def test_a_new_kind_is_one_register_call(tmp_path):
    register(ModelKind("toy_test_kind", ToyConfig, Toy, backbone=lambda c: c.backbone, backbone_prefix="backbone."))
    assert "toy_test_kind" in kinds()
    toy = Toy(ToyConfig(classes=7))
    loaded, kind, cfg = load_model(save_model(tmp_path / "toy.safetensors", toy))
    assert kind == "toy_test_kind" and cfg["classes"] == 7 and loaded.head.out_features == 7
    BEiTViT(backbone_config(toy)).load_state_dict(backbone_state_dict(toy), strict=True)
    with pytest.raises(ValueError, match="already registered"):
        register(ModelKind("toy_test_kind", ViTConfig, BEiTViT))


def test_unregistered_model_is_named():
    with pytest.raises(TypeError, match="no model kind registered for Linear"):
        kind_of(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- trainer hooks

class Blobs(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class Classify(TrainTask):
    def forward(self, batch):
        return nn.functional.cross_entropy(self.net(batch["image"]).float(), batch["label"]), {}


def test_trainer_hooks_build_the_optimizer_and_run_after_each_step(tmp_path):
    seed_everything(0)
    model = BEiTViT(tiny_vit(num_classes=3))
    built, calls = [], []

    def sgd(m: nn.Module, ocfg: OptimConfig) -> torch.optim.Optimizer:
        built.append(m)
        return torch.optim.SGD(m.parameters(), lr=ocfg.lr, momentum=0.5)

    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=4, precision="fp32", progress=False,
                      tensorboard=False)
    ocfg = OptimConfig(lr=1e-2, warmup_epochs=0)
    trainer = Trainer(Classify(model), Blobs(), cfg, ocfg, dist=init_distributed("cpu"), optimizer=sgd,
                      after_step=(lambda: calls.append(trainer.global_step),))
    assert built == [model] and isinstance(trainer.optimizer, torch.optim.SGD)
    result = trainer.fit()
    assert result.status == "finished" and result.global_step == 4
    assert calls == [0, 1, 2, 3]  # once per applied step, before the step counter moves on
    assert load_model(tmp_path / "model.safetensors")[1] == "vit"  # kind read from the model


# --------------------------------------------------------------------------------------------------- layers

LAYER = {"config": 0, "utils": 0, "models": 1, "data": 1, "masking": 1, "checkpoint": 2, "interop": 2, "engine": 3,
         "tasks": 4, "mim_targets": 4, "teachers": 4, "eval": 5, "report": 6, "commands": 7, "cli": 7,
         "__init__": 7, "__main__": 7}
SIBLINGS = {"models", "data", "masking"}  # layer 1: independent of each other


def _imports(path: Path) -> list[str]:
    """Top-level beitv2 module of every relative import in ``path`` (lazy imports inside functions included)."""
    parts = path.relative_to(SRC).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:-1])[: len(parts) - node.level]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.append(target[0])
    return out


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        me = f.relative_to(SRC).parts[0].removesuffix(".py")
        assert me in LAYER, f"{f}: add its top-level module to the layer table (docs/architecture.md)"
        for t in _imports(f):
            if t != me and (LAYER[t] > LAYER[me] or (me in SIBLINGS and t in SIBLINGS)):
                bad.append(f"{f.relative_to(SRC)} imports {t}")
    assert not bad, bad


def test_library_code_never_switches_the_matplotlib_backend(tmp_path):
    assert not [f for f in SRC.rglob("*.py") if "matplotlib.use(" in f.read_text()]
    import matplotlib

    from beitv2.eval.plots import save_confusion_matrix

    before = matplotlib.get_backend()
    out = save_confusion_matrix(torch.eye(3, dtype=torch.long).numpy() * 4, ["a", "b", "c"], tmp_path / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.get_backend() == before
