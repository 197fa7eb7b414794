"""What the training commands share: ``--config``/``--preset`` handling, YAML recipes, process set-up."""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ..config import (
    ConfigError,
    ConfigPrinted,
    add_arguments,
    check_output_dir,
    config_problems,
    dump_yaml,
    from_dict,
    layered,
    merge,
    one_line,
    to_dict,
    validate_config,
)
from ..engine.state import find_resume

T = TypeVar("T")

log = logging.getLogger("beitv2")

def _recipe_files() -> dict[str, Any]:
    """name -> resource of every recipe shipped in the package (``beitv2/configs/*.yaml``, also inside a wheel)."""
    root = importlib.resources.files("beitv2") / "configs"
    if not root.is_dir():
        return {}
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_recipes() -> list[str]:
    return sorted(_recipe_files())


def recipe_text(name: str) -> str:
    files = _recipe_files()
    if name not in files:
        raise ConfigError(f"preset: unknown recipe {name!r} (known: {', '.join(sorted(files)) or 'none found'})")
    return files[name].read_text()


def load_recipe(name: str) -> dict:
    try:
        data = yaml.safe_load(recipe_text(name)) or {}
    except yaml.YAMLError as e:  # pragma: no cover - shipped recipes are tested
        raise ConfigError(f"preset: {name} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset: {name} must hold a mapping")
    return data


def configure_parser(parser: argparse.ArgumentParser, cfg_cls: type) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of options (overrides the recipe; command-line options override it)")
    parser.add_argument("--preset", metavar="NAME", default=None,
                        help=f"a recipe shipped with the package, in src/beitv2/configs/ ({', '.join(list_recipes())})")
    add_print_config(parser)
    add_arguments(parser, cfg_cls)


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults < recipe < --config < options) as YAML "
                             "and exit")


def maybe_print_config(cfg: Any, args: argparse.Namespace, problems: Sequence[str] = ()) -> None:
    """With ``--print-config``: print ``cfg`` as YAML and stop the command (exit status 0).

    ``problems`` (what validation would still reject: a missing required value, a path that does not exist) follow
    the YAML as comments, so the output stays valid YAML; stderr says that the configuration is not complete."""
    if getattr(args, "print_config", False):
        print(dump_yaml(cfg) if not isinstance(cfg, dict) else yaml.safe_dump(cfg, sort_keys=False), end="")
        if problems:
            print("# not ready to run yet:")
            for p in problems:
                print(f"#   {p}")
            print(f"beitv2: printed the configuration; {len(problems)} value(s) still to fix, listed at its end",
                  file=sys.stderr)
        raise ConfigPrinted


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def follow_channels(data: dict, given: set[str], fields: Sequence[str]) -> None:
    """One channel count for the data and every model input: when the user set ``data.channels`` or one of the
    models' ``fields`` (in_chans) himself and all he set agree, every other one takes that value (a recipe's
    grayscale defaults then follow ``--data.channels 3``). Values he set that disagree are left for validation to
    name."""
    names = ("data.channels", *fields)
    chosen = {_get(data, n) for n in names if n in given}
    if len(chosen) == 1:
        value = chosen.pop()
        for n in names:
            _set(data, n, value)


def resolve_config(cfg_cls: type[T], args: argparse.Namespace) -> T:
    """defaults < recipe < --config YAML < command line; validated (ConfigError names the field).

    A config class may list its models' input-channel fields in ``CHANNEL_FIELDS`` (see `follow_channels`)."""
    recipe: dict[str, Any] | None = load_recipe(args.preset) if args.preset else None
    data, given = layered(cfg_cls, args, recipe=recipe, yaml_path=args.config)
    follow_channels(data, given, getattr(cfg_cls, "CHANNEL_FIELDS", ()))
    cfg = from_dict(cfg_cls, data)
    if getattr(args, "print_config", False):
        maybe_print_config(cfg, args, config_problems(cfg))
    validate_config(cfg)
    return cfg


def config_from(cfg_cls: type[T], data: dict, recipe: str | None = None) -> T:
    """The config ``beitv2 <command> [--preset NAME] --config FILE`` builds when FILE holds ``data``: defaults <
    recipe < ``data``, channel fields followed, validated. Programs that compose commands (the demo) build their
    configs with it and call the command's ``execute`` directly."""
    merged = merge(load_recipe(recipe), copy.deepcopy(data)) if recipe else copy.deepcopy(data)
    given = set(_flat(data))
    follow_channels(merged, given, getattr(cfg_cls, "CHANNEL_FIELDS", ()))
    cfg = from_dict(cfg_cls, merged)
    validate_config(cfg)
    return cfg


# what a rerun into the folder of an earlier run may change and still continue it (`check_rerun`); everything else
# (architecture, data, augmentation, optimizer, batch, seed, precision) must be what the run was started with;
# data.channels is tied to the architecture's in_chans where it matters and follows the backbone elsewhere
RESUMABLE = ("data.channels", "train.epochs", "train.stop_after_steps", "train.save_every_steps", "train.keep_last",
             "train.log_every_steps", "train.stop_check_every_steps", "train.eval_every_epochs", "train.progress",
             "train.tensorboard", "train.wandb", "train.wandb_entity", "train.wandb_run_name", "train.device",
             "train.compile", "train.tf32", "train.dist_timeout_min", "train.find_unused_parameters", "train.resume",
             "train.output_dir", "data.num_workers", "data.download", "teacher.local_files_only")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _differences(old: dict, new: dict, keep: Callable[[str], bool]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '(unset)')!r} in the run, {b.get(k, '(unset)')!r} now" for k in sorted(set(a) | set(b))
            if keep(k) and a.get(k) != b.get(k)]


def _listed(diffs: list[str], limit: int = 3) -> str:
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_rerun(cfg: Any, arch: Sequence[str]) -> None:
    """Before any work: a run started in ``train.output_dir`` continues only with the configuration it was started
    with (up to `RESUMABLE`), else exit 2 naming what differs; an explicit ``--train.resume CHECKPOINT`` continues
    it with new settings (listed in a warning) but the same architecture (the sections ``arch``, whose values shape
    the weights)."""
    t = cfg.train
    check_output_dir(t.output_dir, "train.output_dir")
    if t.resume == "none":
        return
    try:
        ckpt = find_resume(Path(t.output_dir), t.resume)
    except FileNotFoundError as e:
        raise ConfigError(one_line(e)) from None
    if ckpt is None:
        return
    try:
        old = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception as e:  # noqa: BLE001 - any unreadable state is the user's file, named below
        raise ConfigError(f"train.resume: cannot read {ckpt}/train_state.pt ({one_line(e)}); delete {ckpt} or pass "
                          "--train.resume none") from None
    if not old:
        return
    new = to_dict(cfg)
    shape = _differences(old, new, lambda k: k.startswith(tuple(arch)))
    if t.resume == "auto":
        diffs = _differences(old, new, lambda k: k not in RESUMABLE)
        if diffs:
            deliberate = "" if shape else f", or continue it with the new settings by --train.resume {ckpt}"
            raise ConfigError(
                f"train.output_dir: {t.output_dir} holds a run started with other settings ({_listed(diffs)}); "
                f"start a new run with another --train.output_dir (or delete {t.output_dir}){deliberate}")
    elif shape:
        raise ConfigError(f"train.resume: {ckpt} holds another architecture ({_listed(shape)}); its weights cannot "
                          "be loaded into this model")
    else:
        changed = _differences(old, new, lambda k: k not in ("train.resume", "train.output_dir"))
        if changed:
            log.warning("continuing %s with changed settings: %s", ckpt, _listed(changed, 6))
    if t.resume == "auto" and old.get("train", {}).get("epochs") != t.epochs:
        log.warning("continuing %s with train.epochs %s (started with %s): the lr schedule is stretched to the new "
                    "length from here on", ckpt, t.epochs, old.get("train", {}).get("epochs"))


def quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
