"""Plots of the report's summary, comparison and training pages: matplotlib figures as PNG data URLs.

Every figure is drawn on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot, no global state, no display), saved as PNG and returned as a ``data:image/png;base64``
URL, so the page stays one self-contained file and its Content-Security-Policy (images from
data URLs only) holds. Labels come from the data (category names, stop reasons): they are drawn
as plain text (mathtext's ``$`` escaped, long labels shortened), never as markup.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Sequence

#: Colours of the two runs of a comparison, and of the series of a line plot.
COLORS = ("#2b5fb4", "#e07b00", "#17803d", "#c0262d", "#7a4fb4", "#5d6673")


@dataclass
class Plot:
    """One figure of a page: ``title``, ``url`` (PNG data URL), ``caption`` (plain text)."""

    title: str
    url: str
    caption: str = ""


def _label(s: object, limit: int = 28) -> str:
    text = str(s).replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


def _figure(width: float = 5.6, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _url(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bars(
    title: str,
    labels: Sequence[object],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    notes: Sequence[str] | None = None,
    percent: bool = False,
    caption: str = "",
) -> Plot:
    """Grouped bar chart: one group per label, one bar per series (``None``: no bar).

    ``notes`` (one per label) are written under the labels (e.g. ``n=40``); ``percent`` shows
    fractions in [0, 1] as percentages on the bars.
    """
    n_labels = max(1, len(labels))
    fig = _figure(max(5.6, min(12.0, 1.0 + 0.7 * n_labels * max(1, len(series)))))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ys = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in values]
        rects = ax.bar(xs, ys, width * 0.95, label=_label(name, 40), color=COLORS[k % len(COLORS)])
        for r, v in zip(rects, values):
            if v is None:
                continue
            text = f"{100 * float(v):.0f}%" if percent else (f"{v:g}" if isinstance(v, int) else f"{float(v):.3g}")
            ax.annotate(text, (r.get_x() + r.get_width() / 2, r.get_height()), ha="center", va="bottom", fontsize=8)
    ticks = [_label(lab) + (f"\n{notes[i]}" if notes else "") for i, lab in enumerate(labels)]
    ax.set_xticks(
        range(len(labels)), ticks, fontsize=8, rotation=0 if len(labels) <= 6 else 30, ha="center" if len(labels) <= 6 else "right"
    )
    if ylim:
        ax.set_ylim(*ylim)
    elif percent:
        ax.set_ylim(0, 1.08)
    if percent:
        ax.yaxis.set_major_formatter(lambda v, _pos: f"{100 * v:.0f}%")
    ax.set_ylabel(_label(ylabel, 40))
    ax.set_title(_label(title, 80), fontsize=11)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return Plot(title, _url(fig), caption)


def histogram(title: str, values: Sequence[float], *, xlabel: str, bins: int = 20, caption: str = "") -> Plot:
    """Histogram of ``values`` with its median marked."""
    vals = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if vals:
        ax.hist(vals, bins=min(bins, max(1, len(set(vals)))), color=COLORS[0], edgecolor="white")
        med = vals[len(vals) // 2]
        ax.axvline(med, color=COLORS[3], linestyle="--", linewidth=1.2, label=f"median {med:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(_label(xlabel, 40))
    ax.set_ylabel("questions")
    ax.set_title(_label(title, 80), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    return Plot(title, _url(fig), caption)


def lines(
    title: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str = "step",
    ylabel: str = "",
    stacked: bool = False,
    caption: str = "",
) -> Plot:
    """Line plot of ``{name: (xs, ys)}`` (``stacked``: stacked bars per x, for counts)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if stacked:
        xs = sorted({x for xs_, _ in series.values() for x in xs_})
        bottom = {x: 0.0 for x in xs}
        for k, (name, (sx, sy)) in enumerate(series.items()):
            vals = dict(zip(sx, sy))
            ys = [float(vals.get(x, 0.0)) for x in xs]
            ax.bar(xs, ys, 0.8, bottom=[bottom[x] for x in xs], label=_label(name, 40), color=COLORS[k % len(COLORS)])
            for x, y in zip(xs, ys):
                bottom[x] += y
    else:
        for k, (name, (sx, sy)) in enumerate(series.items()):
            pts = [(float(x), float(y)) for x, y in zip(sx, sy) if y is not None and math.isfinite(float(y))]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o" if len(pts) <= 30 else None,
                markersize=3,
                label=_label(name, 40),
                color=COLORS[k % len(COLORS)],
            )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_xlabel(_label(xlabel, 40))
    ax.set_ylabel(_label(ylabel, 40))
    ax.set_title(_label(title, 80), fontsize=11)
    if len(series) > 1 or stacked:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return Plot(title, _url(fig), caption)
