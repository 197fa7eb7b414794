"""What the training commands share: ``--config``/``--preset`` handling, YAML presets, process set-up."""

from __future__ import annotations

import argparse
import importlib.resources
import logging
from typing import Any, TypeVar

import yaml

from ..config import ConfigError, ConfigPrinted, add_arguments, build_config, dump_yaml

T = TypeVar("T")

def _preset_files() -> dict[str, Any]:
    """name -> resource of every recipe shipped in the package (``beitv2/configs/*.yaml``, also inside a wheel)."""
    root = importlib.resources.files("beitv2") / "configs"
    if not root.is_dir():
        return {}
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    return sorted(_preset_files())


def preset_text(name: str) -> str:
    files = _preset_files()
    if name not in files:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(sorted(files)) or 'none found'})")
    return files[name].read_text()


def load_preset(name: str) -> dict:
    try:
        data = yaml.safe_load(preset_text(name)) or {}
    except yaml.YAMLError as e:  # pragma: no cover - shipped presets are tested
        raise ConfigError(f"preset: {name} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset: {name} must hold a mapping")
    return data


def configure_parser(parser: argparse.ArgumentParser, cfg_cls: type) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of options (overrides the preset; command-line options override it)")
    parser.add_argument("--preset", metavar="NAME", default=None,
                        help=f"a recipe shipped with the package, in src/beitv2/configs/ ({', '.join(list_presets())})")
    add_print_config(parser)
    add_arguments(parser, cfg_cls)


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults < preset < --config < options) as YAML "
                             "and exit")


def maybe_print_config(cfg: Any, args: argparse.Namespace) -> None:
    """With ``--print-config``: print ``cfg`` as YAML and stop the command (exit status 0)."""
    if getattr(args, "print_config", False):
        print(dump_yaml(cfg) if not isinstance(cfg, dict) else yaml.safe_dump(cfg, sort_keys=False), end="")
        raise ConfigPrinted


def resolve_config(cfg_cls: type[T], args: argparse.Namespace) -> T:
    """defaults < preset < --config YAML < command line; validated (ConfigError names the field)."""
    preset: dict[str, Any] | None = load_preset(args.preset) if args.preset else None
    cfg = build_config(cfg_cls, args, preset=preset, yaml_path=args.config)
    maybe_print_config(cfg, args)
    return cfg


def quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
