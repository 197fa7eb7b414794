"""`beitv2` command line: one sub-command per module in `beitv2.commands`.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``. Modules are imported
only when their command is chosen or ``--help`` lists them, so start-up stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import ConfigError, ConfigPrinted

COMMANDS = {
    "train-tokenizer": "train_tokenizer",
    "pretrain": "pretrain",
    "linprobe": "linprobe",
    "knn": "knn",
    "finetune": "finetune",
    "convert": "convert",
    "tokenize": "tokenize",
    "atlas": "atlas",
    "report": "report",
    "quickstart": "quickstart",
    "segment": "segment",
}


def _load(module: str):
    return importlib.import_module(f"beitv2.commands.{module}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends argparse's "(default: X)" only where the help does not say it already: config options parse to None
    (so an override is told from a default) and state their real default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beitv2",
        description="BEiT v2 end to end: train a VQ-KD tokenizer, pre-train by masked image modeling, evaluate, "
                    "convert checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"beitv2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            try:
                help_line = _load(module).HELP
            except ImportError:
                continue
            sub.add_parser(name, help=help_line)
            continue
        try:
            mod = _load(module)
        except ImportError as e:  # a command whose module is missing must not break the others
            if only is not None:
                raise
            logging.getLogger("beitv2").debug("command %s unavailable: %s", name, e)
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=_HelpFormatter)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except ConfigPrinted:
        return 0
    except ConfigError as e:
        print(f"beitv2 {args.command}: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
