"""`beitv2 report RUN_DIR [RUN_DIR ...]`: training curves of any run from its metrics.jsonl.

One panel per quantity the runs logged (loss, both MIM accuracies, codes used and perplexity per batch, the
tokenizer's cosine to its teacher, validation top-1), one line per run. Writes a PNG (default
``RUN_DIR/training_curves.png``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, reading
from ..report.plots import plot_training_curves
from ._training import add_print_config, maybe_print_config

HELP = "draw the training curves of one or more runs from their metrics.jsonl"
DESCRIPTION = __doc__


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", nargs="+", type=Path, help="run folder(s) holding metrics.jsonl, or the files")
    parser.add_argument("--out", type=Path, default=None, help="PNG file (default: RUN_DIR/training_curves.png)")
    parser.add_argument("--title", default="", help="figure title")
    add_print_config(parser)


def run(args: argparse.Namespace) -> int:
    out = args.out or (args.run_dir[0] if args.run_dir[0].is_dir() else args.run_dir[0].parent) / \
        "training_curves.png"
    maybe_print_config({"run_dir": [str(d) for d in args.run_dir], "out": str(out), "title": args.title}, args)
    runs: dict[str, Path] = {}
    for d in args.run_dir:
        path = d / "metrics.jsonl" if d.is_dir() else d
        if not path.is_file():
            raise ConfigError(f"run_dir: no metrics.jsonl in {d}")
        label = path.parent.name or str(path.parent)
        runs[label if label not in runs else str(path.parent)] = path
    with reading("run_dir"):
        panels = plot_training_curves(runs, out, title=args.title)
    print(f"wrote {out}: {', '.join(panels)}")
    return 0
