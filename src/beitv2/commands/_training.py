"""What the training commands share: ``--config``/``--preset`` handling, YAML presets, process set-up."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..config import ConfigError, ConfigPrinted, add_arguments, build_config, dump_yaml

T = TypeVar("T")

PRESET_DIRS = (Path(__file__).resolve().parents[3] / "configs", Path(__file__).resolve().parents[1] / "configs")


def preset_path(name: str) -> Path:
    for d in PRESET_DIRS:
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(list_presets()) or 'none found'})")


def list_presets() -> list[str]:
    names = {p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def load_preset(name: str) -> dict:
    data = yaml.safe_load(preset_path(name).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset: {name} must hold a mapping")
    return data


def configure_parser(parser: argparse.ArgumentParser, cfg_cls: type) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of options (overrides the preset; command-line options override it)")
    parser.add_argument("--preset", metavar="NAME", default=None,
                        help=f"a recipe from configs/ ({', '.join(list_presets())})")
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
