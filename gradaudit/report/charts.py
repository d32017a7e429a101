"""Charts for the HTML report: matplotlib figures rendered to inline SVG.

The SVG is made to live inside an HTML page that must open offline: text stays text
(``svg.fonttype = "none"``, generic font families, no embedded or linked fonts), the
``<?xml ...>`` header, DOCTYPE and metadata block are removed, element ids are
deterministic (``svg.hashsalt``) so the same report renders byte-identically, and the
foreground colour is the CSS variable ``--chart-fg`` so the chart follows the page's
light or dark theme.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

#: Placeholder colours replaced by CSS variables after rendering.
_FG = "#010203"
_GRID = "#040506"
_BAND_DECADES = 3.0

GRAD = "#d9480f"
ACT = "#1c7ed6"


def depth_chart(report: AuditReport) -> str | None:
    """Gradient RMS and activation RMS per layer (predicted, and measured when probed)
    on a log scale across depth, with the vanishing (<= 1e-3 of the last weight layer's
    gradient) and exploding (>= 1e3) bands shaded. ``None`` when there are no layers."""
    data = series(report)
    if data is None:
        return None
    finite = [v for v in data["grad"] + data["act"] + data["grad_measured"] + data["act_measured"] if v == v]
    if not finite:
        return None
    # no pyplot: the caller's backend and global figure state stay untouched
    import matplotlib
    from matplotlib.figure import Figure

    x, g_pred, a_pred, g_meas, a_meas = data["x"], data["grad"], data["act"], data["grad_measured"], data["act_measured"]
    has_meas = data["measured"]
    ref = data["reference"]

    rc = {
        "svg.fonttype": "none",
        "svg.hashsalt": "gradaudit",
        "font.family": ["sans-serif"],
        "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "sans-serif"],
        "font.size": 9.0,
        "axes.edgecolor": _FG,
        "axes.labelcolor": _FG,
        "xtick.color": _FG,
        "ytick.color": _FG,
        "text.color": _FG,
        "legend.frameon": False,
    }
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(8.0, 3.6), layout="constrained")
        ax = fig.add_subplot()
        lo, hi = min(finite), max(finite)
        if ref:
            lo, hi = min(lo, ref * 10 ** (-_BAND_DECADES - 0.5)), max(hi, ref * 10 ** (_BAND_DECADES + 0.5))
        ymin, ymax = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        if ref:
            ax.axhspan(ymin, ref * 10**-_BAND_DECADES, color=ACT, alpha=0.10, lw=0, label="vanishing band (\u2264 1e-3 \u00d7 last layer)")
            ax.axhspan(ref * 10**_BAND_DECADES, ymax, color=GRAD, alpha=0.10, lw=0, label="exploding band (\u2265 1e3 \u00d7 last layer)")
        ax.plot(x, g_pred, color=GRAD, lw=1.8, marker="o", ms=2.5, label="gradient RMS (predicted)")
        ax.plot(x, a_pred, color=ACT, lw=1.8, ls="--", marker="o", ms=2.5, label="activation RMS (predicted)")
        if has_meas:
            ax.plot(x, g_meas, color=GRAD, lw=0, marker="x", ms=5, label="gradient RMS (measured)")
            ax.plot(x, a_meas, color=ACT, lw=0, marker="+", ms=6, label="activation RMS (measured)")
        ax.set_yscale("log")
        ax.set_ylim(ymin, ymax)
        ax.set_xlim(0.5, len(x) + 0.5)
        ax.set_xlabel("layer, in execution order (input \u2192 output)")
        ax.set_ylabel("RMS")
        ax.grid(True, which="major", color=_GRID, lw=0.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if len(x) <= 40:
            ax.set_xticks(x)
            ax.tick_params(axis="x", labelsize=7)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", transparent=True, metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return clean_svg(buf.getvalue(), title="Gradient and activation RMS per layer")


def series(report: AuditReport) -> dict | None:
    """What the depth chart plots: per layer (1 = nearest the input) the predicted and
    measured gradient and activation RMS (NaN where missing or not positive), and the
    band limits ``reference * 1e-3`` / ``reference * 1e3`` where ``reference`` is the
    predicted gradient RMS of the last weight layer (the last layer when none has a
    depth). ``None`` when there are no layers."""
    layers = [layer for layer in report.layers if layer.predicted is not None]
    if not layers:
        return None

    def pos(vals):
        return [float(v) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else float("nan") for v in vals]

    grad = pos([layer.predicted.grad_rms for layer in layers])
    act = pos([layer.predicted.act_rms for layer in layers])
    measured = [layer.measured for layer in layers]
    weight = [g for layer, g in zip(layers, grad, strict=True) if layer.depth is not None and g == g]
    ref = weight[-1] if weight else next((g for g in reversed(grad) if g == g), None)
    return {
        "x": list(range(1, len(layers) + 1)),
        "modules": [layer.module or layer.node for layer in layers],
        "grad": grad,
        "act": act,
        "grad_measured": pos([m.grad_rms if m else float("nan") for m in measured]),
        "act_measured": pos([m.act_rms if m else float("nan") for m in measured]),
        "measured": any(m is not None for m in measured),
        "reference": ref,
        "vanishing_below": None if ref is None else ref * 10**-_BAND_DECADES,
        "exploding_above": None if ref is None else ref * 10**_BAND_DECADES,
    }


def clean_svg(svg: str, title: str | None = None) -> str:
    """An SVG document made fit to inline into HTML (see the module docstring)."""
    svg = re.sub(r"<\?xml[^>]*\?>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = svg.replace(_FG, "var(--chart-fg)").replace(_GRID, "var(--chart-grid)")
    svg = re.sub(r'<svg ', '<svg class="chart" role="img" ', svg, count=1)
    svg = re.sub(r'width="[\d.]+pt" height="[\d.]+pt"', 'width="100%"', svg, count=1)
    if title:
        from markupsafe import escape

        svg = re.sub(r"(<svg[^>]*>)", lambda m: f"{m.group(1)}<title>{escape(title)}</title>", svg, count=1)
    return svg.strip()
