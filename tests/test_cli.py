"""Command-line conventions shared by every command: booleans, --print-config, dotted option names, and bad input
files rejected with exit status 2 and one line naming the option (no traceback)."""

import collections
import re

import pytest
import torch
import yaml
from _helpers import write_fmnist
from safetensors.torch import save_file

from beitv2.checkpoint import save_model
from beitv2.cli import COMMANDS, main
from beitv2.models.architectures import build_model

# the smallest arguments each command needs to resolve its configuration
MINIMAL = {
    "train-tokenizer": ["--data.kind", "fmnist"],
    "pretrain": ["--model.target", "pixels", "--data.kind", "fmnist"],
    "linprobe": ["--model.random_init", "--model.preset", "vit_tiny", "--data.kind", "fmnist"],
    "knn": ["--model.random_init", "--model.preset", "vit_tiny", "--data.kind", "fmnist"],
    "finetune": ["--model.random_init", "--model.preset", "vit_tiny", "--data.kind", "fmnist"],
    "convert": ["--from", "beitv2", "--to", "hf", "in.safetensors", "out"],
    "quickstart": ["--fast"],
    "tokenize": ["--tokenizer.checkpoint", "tok.safetensors", "--data.kind", "fmnist"],
    "atlas": ["--tokenizer.checkpoint", "tok.safetensors", "--data.kind", "fmnist"],
    "report": ["runs/x"],
    "segment": ["--model.random_init", "--model.preset", "vit_tiny", "--data.kind", "fmnist"],
}


def _printed(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_command_prints_its_resolved_config(capsys):
    assert set(COMMANDS) <= set(MINIMAL), "add the new command to MINIMAL"
    for name in COMMANDS:
        cfg = _printed(capsys, [name, *MINIMAL[name], "--print-config"])
        assert isinstance(cfg, dict) and cfg, name


def test_help_states_each_default_once(capsys):
    """Config options parse to None (so overrides can be told from defaults) and state their real default in their
    help; argparse must not add a second, wrong "(default: None)"; plain options keep argparse's."""
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\(default: [^)]*\) \(default: None\)", text), name
        if name == "knn":
            assert text.count("(default: 0.07)") == 1
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "(default: demo_out)" in " ".join(capsys.readouterr().out.split())


def test_print_config_layers_preset_and_overrides(capsys):
    cfg = _printed(capsys, ["train-tokenizer", "--preset", "vqkd_tiny_fmnist", "--optim.lr", "0.002",
                            "--print-config"])
    assert cfg["optim"]["lr"] == 0.002
    assert cfg["tokenizer"]["vqkd"]["quantizer"]["num_codes"] == 512  # from the preset
    assert cfg["train"]["output_dir"] == "runs/vqkd_tiny_fmnist"


@pytest.mark.parametrize("flags, expected", [
    ([], None), (["--train.compile"], True), (["--train.compile", "true"], True),  # default None = auto
    (["--train.compile", "false"], False), (["--no-train.compile"], False),
    (["--train.compile", "--no-train.compile"], False), (["--train.compile", "yes"], True),
])
def test_boolean_options_bare_negated_and_valued(capsys, flags, expected):
    cfg = _printed(capsys, ["pretrain", "--model.target", "pixels", "--data.kind", "fmnist", *flags,
                            "--print-config"])
    assert cfg["train"]["compile"] is expected


def test_boolean_option_rejects_other_words(capsys):
    assert main(["pretrain", "--model.target", "pixels", "--data.kind", "fmnist", "--train.compile", "maybe",
                 "--print-config"]) == 2
    assert "train.compile" in capsys.readouterr().err


def test_convert_takes_dotted_and_old_option_names(capsys):
    new = _printed(capsys, ["convert", "--from", "official-pretrain", "--to", "beitv2", "--target", "finetune",
                            "--model.img_size", "48", "--model.num_classes", "4", "a.pth", "b", "--print-config"])
    old = _printed(capsys, ["convert", "--from", "official-pretrain", "--to", "beitv2", "--target", "finetune",
                            "--img-size", "48", "--num-classes", "4", "a.pth", "b", "--print-config"])
    assert new == old and new["model"]["img_size"] == 48 and new["model"]["num_classes"] == 4
    rect = _printed(capsys, ["convert", "--from", "beitv2", "--to", "hf", "--model.img_size", "32x48", "a", "b",
                             "--print-config"])
    assert rect["model"]["img_size"] == [32, 48]


# ------------------------------------------------------------------------------------------- bad input files

class NotATensor:
    pass


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.safetensors").write_text("not a safetensors file")
    (d / "text.pth").write_text("not a torch file")
    torch.save({"w": torch.zeros(2), "obj": NotATensor(), "c": collections.Counter()}, d / "code.pth")
    save_file({"w": torch.zeros(2)}, str(d / "foreign.safetensors"))  # safetensors without beitv2 metadata
    save_model(d / "vit.safetensors", build_model("vit_tiny"))
    from beitv2.models.dvae import DiscreteVAE, dvae_tiny

    save_model(d / "dvae.safetensors", DiscreteVAE(dvae_tiny()))
    return d


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return write_fmnist(tmp_path_factory.mktemp("fmnist"), 8, 4)


BAD = ["missing.safetensors", "text.safetensors", "text.pth", "code.pth", "foreign.safetensors"]
CASES = [
    ("pretrain", "--tokenizer.checkpoint", ["--preset", "beitv2_tiny_fmnist"], BAD + ["vit.safetensors"]),
    ("finetune", "--model.checkpoint", [], BAD + ["dvae.safetensors"]),
    ("knn", "--model.checkpoint", [], BAD + ["dvae.safetensors"]),
    ("linprobe", "--model.checkpoint", [], BAD + ["dvae.safetensors"]),
    ("train-tokenizer", "--teacher.checkpoint",
     ["--preset", "vqkd_tiny_fmnist", "--teacher.random_init", "false"], BAD[:4]),
    ("train-tokenizer", "--teacher.name_or_path",
     ["--preset", "vqkd_tiny_fmnist", "--teacher.kind", "beitv2", "--no-teacher.random_init"],
     BAD + ["dvae.safetensors"]),
]


@pytest.mark.parametrize("command, option, extra, files", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_bad_files_exit_2_with_one_line_naming_the_option(capsys, bad_files, fmnist_root, command, option, extra,
                                                          files):
    data = ["--data.kind", "fmnist", "--data.path", str(fmnist_root), "--data.num_workers", "0",
            "--train.output_dir" if command not in ("knn",) else "--run.output_dir", str(bad_files / "out")]
    for name in files:
        capsys.readouterr()
        rc = main([command, *extra, *data, option, str(bad_files / name)])  # an exception here fails the test
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert rc == 2, (name, err)
        assert len(err) == 1 and option.lstrip("-") in err[0], (name, err)


def test_bad_config_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [unclosed\n")
    assert main(["pretrain", "--model.target", "pixels", "--data.kind", "fmnist", "--config", str(bad)]) == 2
    assert "config:" in capsys.readouterr().err


def test_convert_bad_inputs_exit_2(bad_files, capsys, tmp_path):
    for name in BAD + ["dvae.safetensors"]:
        capsys.readouterr()
        rc = main(["convert", "--from", "beitv2", "--to", "hf", str(bad_files / name), str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and "input" in err and len(err.strip().splitlines()) == 1, (name, err)
    rc = main(["convert", "--from", "official-pretrain", "--to", "beitv2", str(bad_files / "code.pth"),
               str(tmp_path / "o")])
    assert rc == 2 and "not weights-only" in capsys.readouterr().err
