"""``report.md``: what was run, how well it did and how long it took, with the figures inline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], first: str = "") -> str:
    """A Markdown table: one row per key of ``rows``, columns = the union of the inner keys (first-seen order)."""
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join([first] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        lines.append("| " + " | ".join([name] + [_fmt(r.get(c)) for c in cols]) + " |")
    return "\n".join(lines)


def _settings_lines(settings: Mapping[str, Any], indent: int = 0) -> list[str]:
    out = []
    for k, v in settings.items():
        if isinstance(v, Mapping):
            out.append(" " * indent + f"- **{k}**")
            out += _settings_lines(v, indent + 2)
        else:
            out.append(" " * indent + f"- {k}: `{v}`")
    return out


def write_report(out_md: str | Path, *, results: Mapping[str, Mapping[str, Any]], timings: Mapping[str, float],
                 settings: Mapping[str, Any], notes: Sequence[str] = (), figures: Mapping[str, str] = (),
                 title: str = "beitv2 report", intro: str = "", sections: Mapping[str, str] = (),
                 cpu_timings: Mapping[str, float] = ()) -> Path:
    """Write the report: intro, notes, the accuracy table (``results``: row -> column -> value), wall time per stage
    (seconds; with ``cpu_timings`` also the CPU seconds, which do not depend on other load on the machine), extra
    ``sections`` (heading -> Markdown), figures (caption -> path relative to the report) and the settings (nested
    mapping). Written atomically."""
    total = sum(float(v) for v in timings.values())
    cpu = dict(cpu_timings)
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    if notes:
        parts += [f"> **Note:** {n}" + "\n" for n in notes]
    parts += ["## Results", "", markdown_table(results, "backbone"), ""]
    if cpu:
        parts += ["## Timings", "", "| stage | wall time (s) | CPU time (s) |", "|---|---|---|"]
        parts += [f"| {k} | {float(v):.1f} | {_fmt(cpu.get(k))} |" for k, v in timings.items()]
        parts += [f"| **total** | **{total:.1f}** | **{sum(cpu.values()):.1f}** |", ""]
    else:
        parts += ["## Timings", "", "| stage | wall time (s) |", "|---|---|"]
        parts += [f"| {k} | {float(v):.1f} |" for k, v in timings.items()]
        parts += [f"| **total** | **{total:.1f}** |", ""]
    for heading, body in dict(sections).items():
        parts += [f"## {heading}", "", body, ""]
    if figures:
        parts += ["## Figures", ""]
        for caption, path in dict(figures).items():
            parts += [f"### {caption}", "", f"![{caption}]({path})", ""]
    parts += ["## Settings", ""] + _settings_lines(settings) + [""]
    return atomic_write_text(out_md, "\n".join(parts))
