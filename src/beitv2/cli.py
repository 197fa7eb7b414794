"""`beitv2` command line: one sub-command per module in `beitv2.commands`.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``. Modules are imported
only when their command is chosen or ``--help`` lists them, so start-up stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
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


def _near(word: str, known) -> str:
    import difflib

    near = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def _unrecognized(parser: argparse.ArgumentParser, chosen: str | None, extra: list[str]) -> str:
    """One line naming what argparse did not know, with the nearest valid option (argparse only lists them)."""
    sub = next((a.choices.get(chosen) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    known = (sub or parser)._option_string_actions
    first = next((e.split("=", 1)[0] for e in extra if e.startswith("-")), extra[0])
    return (f"unrecognized argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}{_near(first, known)}; "
            f"see beitv2 {chosen + ' ' if chosen else ''}--help")


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. Run as the program (``argv`` None), a failure ends the process with one line
    on stderr (`_fail`); a caller that passes ``argv`` gets the exception as before."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    if chosen is None and "--version" in argv:  # answered before any command module (and torch) is imported
        print(f"beitv2 {__version__}")
        return 0
    if argv and not argv[0].startswith("-") and chosen is None:
        print(f"beitv2: error: unknown command {argv[0]!r}{_near(argv[0], COMMANDS)}; see beitv2 --help",
              file=sys.stderr)
        return 2
    parser = build_parser(only=chosen)
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"beitv2{' ' + chosen if chosen else ''}: error: {_unrecognized(parser, chosen, extra)}",
              file=sys.stderr)
        return 2
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
    except (Exception, KeyboardInterrupt) as e:
        if not as_program:
            raise
        _fail(args.command, e)
        raise  # not reached: _fail exits


def _fail(command: str, exc: BaseException) -> None:
    """The last stop of a failed command: one line on stderr (a full disk, a second Ctrl-C, a data-loader worker's
    error, a bug), then an immediate exit that kills any data-loader worker still alive, so nothing left behind (a
    worker, a thread, an atexit handler) can keep the process from ending. ``BEITV2_TRACEBACK=1`` also prints the
    traceback."""
    from .engine.distributed import exit_now, failure_line  # deferred: torch, which `--version` never loads

    line, code = failure_line(exc)
    exit_now(f"beitv2 {command}: {line}", code, exc)


if __name__ == "__main__":
    raise SystemExit(main())
