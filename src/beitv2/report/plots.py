"""Training curves from the ``metrics.jsonl`` files the engine writes (one line per logged step / epoch / val)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..utils.figures import figure, save_figure

log = logging.getLogger("beitv2.report")

# (panel title, record type, [(key, legend suffix)], log y-axis)
PANELS: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("training loss", "step", [("loss", "")], True),
    ("MIM accuracy (masked patches)", "step", [("mlm_acc_1", "final head"), ("mlm_acc_2", "aggregation head")],
     False),
    ("codes used per batch", "step", [("batch_codes_used", "")], False),
    ("codebook perplexity per batch", "step", [("batch_perplexity", "")], False),
    ("tokenizer: cosine to teacher features", "step", [("teacher_cos", "")], False),
    ("validation top-1 (%)", "val", [("acc1", "")], False),
]


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file; unreadable lines are skipped with a warning naming the file and line."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            log.warning("%s:%d: skipped unreadable line (%s)", path, i, e)
    return rows


def _series(rows: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if r.get("type") == kind and isinstance(v, (int, float)):
            xs.append(float(r.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def plot_training_curves(metrics_jsonl_paths: Mapping[str, str | Path] | Sequence[str | Path],
                         out_png: str | Path, title: str = "") -> list[str]:
    """One panel per quantity any run logged (loss, MIM accuracy, codebook usage and perplexity, ...), one line per
    run. ``metrics_jsonl_paths``: {run label: path} or paths (labelled by their folder). Returns the panel titles."""
    if isinstance(metrics_jsonl_paths, Mapping):
        runs = {str(k): Path(v) for k, v in metrics_jsonl_paths.items()}
    else:
        runs = {Path(p).parent.name or str(p): Path(p) for p in metrics_jsonl_paths}
    data = {label: read_jsonl(p) for label, p in runs.items() if p.is_file()}
    for label, p in runs.items():
        if label not in data:
            log.warning("training curves: %s (%s) not found; skipped", p, label)
    panels = []
    for ptitle, kind, keys, logy in PANELS:
        lines = []
        for label, rows in data.items():
            for key, suffix in keys:
                xs, ys = _series(rows, kind, key)
                if xs:
                    lines.append((f"{label} {suffix}".strip(), xs, ys, kind == "val"))
        if lines:
            panels.append((ptitle, lines, logy))
    if not panels:
        raise ValueError(f"no plottable metrics in {[str(p) for p in runs.values()]}")
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = figure(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (ptitle, lines, logy) in zip(axes.flat, panels):
        for label, xs, ys, markers in lines:
            ax.plot(xs, ys, label=label, marker="o" if markers or len(xs) < 4 else None, markersize=3, linewidth=1.2)
        if logy and all(y > 0 for _, _, ys, _ in lines for y in ys):
            ax.set_yscale("log")
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_png)
    return [p[0] for p in panels]
