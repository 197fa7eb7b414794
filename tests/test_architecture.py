"""The package's structure: one model registry, the trainer's hooks, and the import layers of docs/architecture.md."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from builders import tiny_mim, tiny_vit, tiny_vqkd
from safetensors import safe_open
from torch import nn

from beitv2.checkpoint import load_model, save_model
from beitv2.config import opt
from beitv2.engine import OptimConfig, TrainConfig, Trainer, init_distributed, seed_everything
from beitv2.models.architectures import ARCHITECTURES, build_model, get_architecture
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.dvae import DiscreteVAE, dvae_tiny
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.models.registry import (
    ModelKind,
    backbone_config,
    backbone_state_dict,
    get_kind,
    kind_of,
    kinds,
    register,
)
from beitv2.tasks import TrainTask

SRC = Path(__file__).resolve().parents[1] / "src" / "beitv2"


def tiny_models() -> dict[str, nn.Module]:
    return {
        "vit": BEiTViT(tiny_vit(num_classes=3)),
        "mim": tiny_mim(),
        "vqkd": tiny_vqkd(encoder={"depth": 2}, num_codes=8),
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


def test_mim_model_config_is_the_mim_config_and_vit_config_its_backbone():
    mim = tiny_models()["mim"]
    assert isinstance(mim.config, MIMConfig) and mim.vit_config is mim.config.backbone
    assert not hasattr(mim, "cfg") and not hasattr(mim, "mim_cfg")  # one name for each config


@pytest.mark.parametrize("kind", ["vit", "mim", "vqkd"])
def test_backbone_of_every_kind_loads_strictly_into_a_vit(kind):
    model = tiny_models()[kind]
    vit = BEiTViT(backbone_config(model))
    state = backbone_state_dict(model)
    assert not any(k.startswith(BEiTv2ForMIM.pretrain_only_keys) for k in state)
    vit.load_state_dict(state, strict=True)
    x = torch.rand(2, vit.vit_config.in_chans, 16, 16)
    src = model.encoder if kind == "vqkd" else model
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x)[0], src.forward_features(x)[0])


def test_dvae_has_no_backbone():
    with pytest.raises(ValueError, match="no ViT backbone"):
        backbone_config(tiny_models()["dvae"])


def test_one_preset_table_holds_every_kind():
    assert {get_architecture(n)[0] for n in ARCHITECTURES} == {"vit", "mim", "vqkd", "dvae"}
    assert kind_of(build_model("dvae_tiny")).name == "dvae"
    with pytest.raises(KeyError, match="unknown architecture"):
        get_architecture("no_such_preset")


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
    register(ModelKind("toy_test_kind", ToyConfig, Toy, backbone="backbone", backbone_prefix="backbone."))
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
         "tasks": 4, "mim_targets": 4, "teachers": 4, "eval": 5, "report": 6, "commands": 7, "demo": 7, "cli": 7,
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


def _module_file(parts: list[str]) -> Path | None:
    p = SRC.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return p / "__init__.py" if (p / "__init__.py").is_file() else None


def _module_imports(path: Path) -> set[Path]:
    """The files of ``beitv2`` that importing ``path`` (or calling its functions: lazy imports count) executes
    directly: each imported module and, for a module of another package, that package's ``__init__``."""
    pkg = list(path.relative_to(SRC).parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[Path | None] = []
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "beitv2"):
            module = (node.module or "").split(".")
            parts = pkg[: len(pkg) - node.level + 1] + module if node.level else module[1:]
            parts = [p for p in parts if p]
            targets = [_module_file(parts + [a.name]) or _module_file(parts) for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [_module_file(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "beitv2"]
        for t in targets:
            if t is None or t == path:
                continue
            tparts = t.relative_to(SRC).parts
            for i in range(1, len(tparts)):  # parent packages run first, unless the importer lives in them
                init = SRC.joinpath(*tparts[:i], "__init__.py")
                if init.is_file() and list(tparts[:i]) != pkg[:i] and init != path:
                    found.add(init)
            found.add(t)
    return found


def _cycles(graph: dict[Path, set[Path]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), as sorted relative paths."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    out: list[list[str]] = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(str(c.relative_to(SRC)) for c in comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    """No two modules import each other, directly or through others, lazy imports inside functions included."""
    graph = {f: _module_imports(f) for f in sorted(SRC.rglob("*.py"))}
    assert _module_imports(SRC / "checkpoint.py") and graph[SRC / "demo" / "stages.py"]  # the graph is not empty
    assert not _cycles(graph), _cycles(graph)


def test_the_circle_check_sees_a_lazy_import():
    a, b, c = SRC / "a.py", SRC / "b.py", SRC / "c.py"
    assert _cycles({a: {b}, b: {c}, c: {a}}) == [["a.py", "b.py", "c.py"]] and not _cycles({a: {b}, b: {c}})
    lazy = _module_imports(SRC / "interop" / "preprocessing.py")  # its data.transforms import is inside a function
    assert SRC / "data" / "transforms.py" in lazy


def test_no_command_imports_another_command():
    """What two commands share lives a layer down (`eval`, `interop.tokenizer_ref`) or in the commands' helper
    `_training`; the demo composes commands from beside them."""
    commands = SRC / "commands"
    bad = [f"{f.name} imports {t.name}" for f in sorted(commands.glob("*.py"))
           for t in _module_imports(f) if t.parent == commands and t.name not in ("_training.py", "__init__.py")]
    assert not bad, bad


def test_one_reader_of_model_files():
    """Every loader of beitv2 model files goes through `checkpoint.read_model_file` (no second safetensors reader)."""
    readers = [str(f.relative_to(SRC)) for f in sorted(SRC.rglob("*.py"))
               if "safe_open(" in f.read_text() or "load_file(" in f.read_text()]
    assert readers == ["checkpoint.py", "eval/feature_cache.py"], readers  # the second reads cached features


def test_library_code_never_switches_the_matplotlib_backend(tmp_path):
    assert not [f for f in SRC.rglob("*.py") if "matplotlib.use(" in f.read_text()]
    import matplotlib

    from beitv2.eval.plots import save_confusion_matrix

    before = matplotlib.get_backend()
    out = save_confusion_matrix(torch.eye(3, dtype=torch.long).numpy() * 4, ["a", "b", "c"], tmp_path / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.get_backend() == before


# ------------------------------------------------------------------------------------------ one model reader

def test_read_model_file_gives_kind_typed_config_and_weights(tmp_path):
    from beitv2.checkpoint import read_model_file

    mim = tiny_models()["mim"]
    run = tmp_path / "run"
    save_model(run / "ckpt-3" / "model.safetensors", mim)
    (run / "latest").write_text("ckpt-3")
    f = read_model_file(run)  # a run folder: its latest checkpoint
    assert f.kind == "mim" and f.path == run / "ckpt-3" / "model.safetensors"
    assert f.config == mim.config and f.config_dict["vocab_size"] == 16
    assert f.state.keys() == mim.state_dict().keys() and torch.equal(f.state["lm_head.weight"], mim.lm_head.weight)
    assert read_model_file(f.path, weights=False).state == {}
    torch.save({"w": torch.zeros(1)}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="not a beitv2 model file"):
        read_model_file(tmp_path / "official.pth")


@pytest.mark.parametrize("kind", ["vit", "mim", "vqkd"])
def test_read_model_file_backbone_reads_only_the_vit_of_any_kind(tmp_path, kind):
    from beitv2.checkpoint import read_model_file

    model = tiny_models()[kind]
    f = read_model_file(save_model(tmp_path / "m.safetensors", model), backbone=True)
    want = backbone_state_dict(model)
    assert f.kind == kind and f.config == backbone_config(model) and f.state.keys() == want.keys()
    assert all(torch.equal(f.state[k], v) for k, v in want.items())
    BEiTViT(f.config).load_state_dict(f.state, strict=True)
    with pytest.raises(ValueError, match="expected one with a ViT backbone"):
        read_model_file(save_model(tmp_path / "d.safetensors", tiny_models()["dvae"]), backbone=True)


def test_config_from_builds_what_the_command_line_builds_from_the_same_yaml(tmp_path):
    """The demo's stages skip the YAML -> command line round trip; the config they run must be the one a user gets
    by rerunning the YAML they are given (defaults < preset < file, channels followed)."""
    import yaml
    from _helpers import write_fmnist

    from beitv2.cli import build_parser
    from beitv2.commands._training import config_from, resolve_config
    from beitv2.commands.segment import SegmentationConfig
    from beitv2.commands.train_tokenizer import TrainTokenizerConfig

    ckpt = save_model(tmp_path / "vit.safetensors", tiny_models()["vit"])
    root = write_fmnist(tmp_path / "fmnist", 8, 4)
    cases = [("train-tokenizer", TrainTokenizerConfig, None,
              {"data": {"kind": "fmnist", "path": str(root), "channels": 1, "subset": 4},
               "optim": {"lr": 2e-3, "betas": [0.9, 0.99]}, "train": {"output_dir": str(tmp_path / "t")}}),
             ("segment", SegmentationConfig, "seg_fmnist_cpu",
              {"model": {"checkpoint": str(ckpt)}, "schedule": {"iters": 4}, "train": {"output_dir": str(tmp_path)}})]
    for command, cls, preset, data in cases:
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [command, *(["--preset", preset] if preset else []), "--config", str(path)]
        from_cli = resolve_config(cls, build_parser(only=command).parse_args(argv))
        ours = config_from(cls, data, preset)
        assert ours == from_cli, command
        if command == "train-tokenizer":  # data.channels given: the encoder's input channels follow it
            assert ours.tokenizer.vqkd.encoder.in_chans == 1
        assert data["train"]["output_dir"] == str(tmp_path / "t" if command == "train-tokenizer" else tmp_path)
    assert ours.schedule.iters == 4 and ours.model.checkpoint == str(ckpt)  # the file over the preset
