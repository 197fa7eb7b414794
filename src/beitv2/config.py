"""Typed configuration: dataclasses that flow from YAML files and the command line to the code.

Every command's options are one (possibly nested) dataclass. `add_arguments` turns it into argparse options named
by dotted paths (``--optim.lr 1e-3``), `build_config` layers defaults < recipe < YAML file < command line, and
`validate_config` walks the result calling each dataclass's ``validate()`` so that a bad value fails before any
compute with a message naming the field.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pickle
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted field name."""


class ConfigPrinted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """``--print-config`` printed the resolved configuration; the command stops with exit status 0."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, cut at ``limit`` characters (library errors can run over many lines)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def reading(option: str, what: str = "") -> Iterator[None]:
    """Turn any failure to read the file an option names into a one-line `ConfigError` naming that option.

    Readers fail in many ways on a wrong file (missing, not safetensors, a pickle that is not weights-only, weights
    of another model); all of them are the user's input, not a bug, so none deserves a traceback.
    """
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{option}: {what}{one_line(e)}") from None
    except Exception as e:  # safetensors' SafetensorError derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"{option}: {what}not a safetensors file ({one_line(e)})") from None


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with a help string for ``--help``."""
    md = {"help": help, **meta}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def check(cond: bool, name: str, msg: str) -> None:
    """Raise `ConfigError` naming ``name`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_value(tp: Any, text: str, name: str) -> Any:
    """Parse one command-line string into the field's declared type."""
    tp, optional = _strip_optional(tp)
    if optional and text.lower() in ("none", "null", ""):
        return None
    origin = get_origin(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {text!r}")
        if origin is Literal:
            choices = get_args(tp)
            if text not in [str(c) for c in choices]:
                raise ValueError(f"expected one of {list(choices)}, got {text!r}")
            return next(c for c in choices if str(c) == text)
        if origin in (tuple, list):
            inner = get_args(tp)[0] if get_args(tp) else str
            items = [s for s in text.replace(",", " ").split() if s]
            vals = [_parse_value(inner, s, name) for s in items]
            return tuple(vals) if origin is tuple else vals
        if tp in (int, float, str):
            return tp(text)
        if tp is Path:
            return Path(text)
        return yaml.safe_load(text)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Coerce a YAML value to the field type (YAML gives lists for tuples, ints for floats, ...)."""
    if value is None:
        return None
    tp, _ = _strip_optional(tp)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        if isinstance(value, str):
            return _parse_value(tp, value, name)
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    if origin is Literal and value not in get_args(tp):
        raise ConfigError(f"{name}: expected one of {list(get_args(tp))}, got {value!r}")
    if tp is Path:
        return Path(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = ""):
    """Yield (dotted_name, type, field) for every leaf field of a nested dataclass type."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, name + ".")
        else:
            yield name, tp, f


def _leaf_default(cls: type, dotted: str) -> Any:
    obj = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _fmt_default(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(str(x) for x in v) if v else "(empty)"
    return str(v)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--dotted.name`` option per leaf field; defaults are shown but not set (None = not given)."""
    groups: dict[str, Any] = {}
    for name, tp, f in iter_fields(cls):
        section = name.rsplit(".", 1)[0] if "." in name else "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        base, _ = _strip_optional(tp)
        choices = ""
        if get_origin(base) is Literal:
            choices = " {" + ",".join(str(c) for c in get_args(base)) + "}"
        default = _leaf_default(cls, name)
        help_text = f"{f.metadata.get('help', '')}{choices} (default: {_fmt_default(default)})"
        if base is bool:  # --x (true), --x false, --no-x
            groups[section].add_argument(f"--{name}", dest=f"cfg::{name}", default=None, nargs="?", const="true",
                                         metavar="true|false", help=help_text)
            groups[section].add_argument(f"--no-{name}", dest=f"cfg::{name}", action="store_const", const="false",
                                         help=f"same as --{name} false")
            continue
        groups[section].add_argument(
            f"--{name}",
            dest=f"cfg::{name}",
            default=None,
            nargs="+" if get_origin(base) in (tuple, list) else None,
            metavar=name.rsplit(".", 1)[-1].upper(),
            help=help_text,
        )


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; ``over`` wins."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: type[T], data: dict, prefix: str = "", base: Any = None) -> T:
    """Build a dataclass from a nested dict, rejecting unknown keys by name.

    Fields the dict leaves out keep the value of ``base`` (default: ``cls()``), so a partial mapping for a nested
    section keeps the defaults its parent's ``default_factory`` chose (e.g. a command's recipe optimizer).
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{prefix}{sorted(unknown)[0]}: unknown option (known: {', '.join(sorted(names))})")
    if base is None:
        try:
            base = cls()
        except TypeError:  # required fields: nothing to inherit
            base = None
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        val = _coerce(tp, data[f.name], prefix + f.name)
        if dataclasses.is_dataclass(tp):
            val = from_dict(tp, val, prefix + f.name + ".", getattr(base, f.name, None))
        kwargs[f.name] = val
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe nested dict (Paths and tuples become strings and lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Call ``validate(prefix)`` on every nested dataclass that defines it, innermost first."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_config(v, prefix + f.name + ".")
    if hasattr(cfg, "validate"):
        cfg.validate(prefix)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {p} is not valid YAML ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must hold a mapping at the top level")
    return data


def _leaf_names(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _leaf_names(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def layered(cls: type, args: argparse.Namespace | None = None, recipe: dict | None = None,
            yaml_path: str | Path | None = None) -> tuple[dict, set[str]]:
    """The merged mapping defaults < recipe < YAML file < command line, and the dotted names the user set himself
    (in the YAML file or on the command line, not through the recipe)."""
    data: dict = {}
    given: set[str] = set()
    if recipe:
        data = merge(data, recipe)
    if yaml_path:
        own = load_yaml(yaml_path)
        data = merge(data, own)
        given |= _leaf_names(own)
    if args is not None:
        leaf_types = {name: tp for name, tp, _ in iter_fields(cls)}
        for key, text in vars(args).items():
            if key.startswith("cfg::") and text is not None:
                name = key[5:]
                text = " ".join(text) if isinstance(text, list) else text
                _set(data, name, _parse_value(leaf_types[name], text, name))
                given.add(name)
    return data, given


def build_config(cls: type[T], args: argparse.Namespace | None = None, recipe: dict | None = None,
                 yaml_path: str | Path | None = None, overrides: dict | None = None) -> T:
    """defaults < recipe < YAML file < command line (< explicit overrides), then validated."""
    data, _ = layered(cls, args, recipe, yaml_path)
    if overrides:
        data = merge(data, overrides)
    cfg = from_dict(cls, data)
    validate_config(cfg)
    return cfg


def config_problems(cfg: Any, prefix: str = "") -> list[str]:
    """What `validate_config` would reject, as far as it can tell: the first problem of every section."""
    found: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            found += config_problems(v, prefix + f.name + ".")
    if hasattr(cfg, "validate"):
        try:
            cfg.validate(prefix)
        except ConfigError as e:
            if one_line(e) not in found:
                found.append(one_line(e))
        except Exception:  # noqa: BLE001 - a cross-section check tripping over a section already listed
            if not found:
                raise
    return found


def check_output_dir(path: str | Path, option: str) -> None:
    """``option`` names a folder this run may create and write in; checked before any work, so that a read-only
    place or a path through a regular file fails at once instead of after the training."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():  # the nearest existing ancestor is where mkdir will start
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"lies under {probe}, a file"
        raise ConfigError(f"{option}: {path} {what}, not a folder; choose another --{option}")
    try:
        import tempfile

        tempfile.TemporaryFile(dir=probe).close()  # os.access says yes to root on a read-only mount
    except OSError as e:
        raise ConfigError(f"{option}: cannot write in {probe} ({e.strerror or e}); choose another --{option}") from None


def dump_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML (what ``--print-config`` prints and runs save as config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(cfg))
