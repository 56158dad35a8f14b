"""The HTML building blocks of the reports (aggregator.report, aggregator.report_fleet): escaping, tables and
inline SVG charts (no external references, no script, no plotting library)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def esc(value: object) -> str:
    """`value` as HTML text (escaped)."""
    return html.escape(str(value))


def num(value: float | None, digits: int = 4) -> str:
    """A number with `digits` decimals, "n/a" when missing or not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells must already be escaped."""
    head_html = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head_html}</tr></thead><tbody>{body}</tbody></table>'


def _nice_step(span: float, count: int) -> float:
    raw = span / count if span > 0 else 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


@dataclass
class Series:
    """One line (or bar group) of a chart: a value, or None for a gap, per x label."""

    label: str
    values: list[float | None]
    dashed: bool = False


def svg_chart(title: str, rounds: list[int], series: list[Series], *, bars: bool = False, y_max: float | None = None,
              y_format=lambda v: f"{v:g}", y_label: str = "", x_label: str = "round") -> str:
    """A line or grouped-bar chart over rounds (or any labels, named by `x_label`) as inline SVG (no external
    references)."""
    width, height, left, right, top, bottom = 760, 300, 64, 16, 44, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    finite = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    top_value = y_max if y_max is not None else max(finite, default=0.0) * 1.05 or 1.0
    step = _nice_step(top_value, 5)
    top_value = y_max if y_max is not None else math.ceil(top_value / step) * step
    n = max(len(rounds), 1)
    band = plot_w / n

    def x_of(i: int) -> float:
        return left + band * (i + 0.5)

    def y_of(v: float) -> float:
        return top + plot_h * (1 - min(max(v / top_value, 0.0), 1.0))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="{left}" y="18" class="title">{esc(title)}</text>']
    tick = 0.0
    while tick <= top_value * (1 + 1e-9):
        y = y_of(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ytick">{esc(y_format(tick))}</text>')
        tick += step
    if y_label:
        parts.append(f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" class="axis">{esc(y_label)}</text>')
    every = max(1, round(_nice_step(n, 12))) if n > 20 else 1
    for i, number in enumerate(rounds):
        if i % every == 0 or i == n - 1:
            parts.append(f'<text x="{x_of(i):.1f}" y="{top + plot_h + 16}" class="xtick">{number}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" class="axis">{esc(x_label)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="frame"/>')
    slot = band * 0.8 / max(len(series), 1)
    for k, s in enumerate(series):
        color = COLORS[k % len(COLORS)]
        legend_x = left + k * 150
        parts.append(f'<rect x="{legend_x}" y="27" width="12" height="8" fill="{color}"/>'
                     f'<text x="{legend_x + 16}" y="35" class="legend">{esc(s.label)}</text>')
        points = [(i, v) for i, v in enumerate(s.values) if v is not None and math.isfinite(v)]
        if bars:
            for i, v in points:
                x = x_of(i) - band * 0.4 + k * slot
                parts.append(f'<rect x="{x:.1f}" y="{y_of(v):.1f}" width="{max(slot - 1, 0.5):.1f}" '
                             f'height="{top + plot_h - y_of(v):.1f}" fill="{color}"><title>{esc(x_label)} {esc(rounds[i])}: '
                             f'{esc(s.label)} {esc(y_format(v))}</title></rect>')
            continue
        runs: list[list[tuple[int, float]]] = []  # a missing value breaks the line
        for i, v in points:
            if runs and runs[-1][-1][0] == i - 1:
                runs[-1].append((i, v))
            else:
                runs.append([(i, v)])
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        for segment in runs:
            coords = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in segment)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        if n <= 100:
            parts += [f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3" fill="{color}"><title>{esc(x_label)} {esc(rounds[i])}: '
                      f'{esc(s.label)} {esc(y_format(v))}</title></circle>' for i, v in points]
    parts.append("</svg>")
    return "".join(parts)
