import argparse
from dataclasses import dataclass, field

import pytest

from beitv2.config import ConfigError, add_arguments, build_config, check, opt, save_yaml
from beitv2.models.backbone import ViTConfig


@dataclass
class Optim:
    lr: float = opt(1e-3, "peak learning rate")
    betas: tuple[float, ...] = opt((0.9, 0.999), "Adam betas")
    kind: str = opt("adamw", "optimizer")

    def validate(self, prefix=""):
        check(self.lr > 0, prefix + "lr", "must be > 0")


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    model: ViTConfig = field(default_factory=ViTConfig)
    epochs: int = opt(3, "epochs")
    name: str | None = opt(None, "run name")


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_arguments(p, Run)
    return p, p.parse_args(argv)


def test_layers_defaults_preset_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.5\n  betas: [0.9, 0.98]\nepochs: 7\n")
    _, args = parse(["--optim.lr", "0.25", "--model.img_size", "32", "48", "--name", "x"])
    cfg = build_config(Run, args, recipe={"epochs": 5, "model": {"depth": 2}}, yaml_path=y)
    assert cfg.optim.lr == 0.25 and cfg.optim.betas == (0.9, 0.98) and cfg.epochs == 7
    assert cfg.model.depth == 2 and cfg.model.img_size == (32, 48) and cfg.name == "x"
    save_yaml(cfg, tmp_path / "out.yaml")
    again = build_config(Run, yaml_path=tmp_path / "out.yaml")
    assert again == cfg


def test_help_lists_every_option_with_default():
    p, _ = parse([])
    text = p.format_help()
    assert "--optim.lr" in text and "(default: 0.001)" in text and "--model.use_shared_rel_pos_bias" in text


@pytest.mark.parametrize("argv,field", [(["--optim.lr", "-1"], "optim.lr"), (["--epochs", "abc"], "epochs"),
                                        (["--model.num_heads", "5"], "model.num_heads"),
                                        (["--model.use_abs_pos_emb", "maybe"], "model.use_abs_pos_emb")])
def test_bad_values_fail_naming_the_field(argv, field):
    _, args = parse(argv)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(Run, args)


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        build_config(Run, yaml_path=y)
