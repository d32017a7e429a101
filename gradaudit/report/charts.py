"""The depth chart of the HTML report, drawn as plain SVG without a plotting library.

:func:`depth_chart` turns the report's per-layer numbers into geometry (the scales, the
ticks, the points of each line, the bands); ``templates/depth_chart.svg.j2`` writes the
SVG elements. The chart is a log-scale line chart over the *weight layers* (x = the
weight-layer depth, 1 = nearest the input), the same layers the text report counts:

- the layer gradient G_l = sqrt(P) x RMS(dL/dy) (:func:`gradaudit.propagation.depth.layer_gradient`,
  the quantity of the headline, GA101/GA102 and the depth summary) and the activation RMS,
  as predicted (lines with dots) and, when the probe ran, as measured (crosses and plus
  signs);
- the vanishing band (layer gradient <= 1e-3 of the last weight layer's) and the
  exploding band (>= 1e3 of it), shaded.

The SVG is made to live inside a page that opens offline: text stays text in generic
font families, no ids, no links, colours of text and grid are the page's CSS variables
(``--chart-fg``, ``--chart-grid``) so the chart follows the light or dark theme, and the
same report gives byte-identical SVG. The y range is the data's range (with the bands)
plus a margin, not rounded to whole decades, so the geometry moves continuously with the
numbers; only the decade ticks inside it are whole (``y-ticks`` group).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradaudit.report.common import fmt_num

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

#: The bands lie this many decades from the last weight layer's gradient RMS.
BAND_DECADES = 3.0
#: Margin of the y range beyond the data, in decades.
MARGIN_DECADES = 0.3
#: At most this many labelled decades on the y axis, and layers labelled on the x axis.
MAX_Y_TICKS = 9
MAX_X_TICKS = 40

GRAD = "#d9480f"
ACT = "#1c7ed6"

#: Size of the drawing (user units; the SVG scales to the page's width) and of the plot area.
WIDTH = 800
LEFT, RIGHT, TOP, BOTTOM = 62.0, 786.0, 12.0, 252.0
LEGEND_ROW = 22.0

_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def series(report: AuditReport) -> dict | None:
    """What the depth chart plots, per weight layer in execution order (x = its
    weight-layer depth): the predicted and measured layer gradient and activation RMS (NaN
    where missing, not positive or not finite: a log axis cannot show them), and the band
    limits ``reference * 1e-3`` / ``reference * 1e3`` where ``reference`` is the predicted
    layer gradient of the last weight layer that has one. ``None`` without weight layers."""
    layers = [layer for layer in report.layers if layer.predicted is not None and layer.depth is not None]
    if not layers:
        return None

    def pos(vals):
        return [float(v) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else float("nan") for v in vals]

    grad = pos([_layer_grad(layer.predicted) for layer in layers])
    measured = [layer.measured for layer in layers]
    ref = next((g for g in reversed(grad) if g == g), None)
    return {
        "x": [layer.depth for layer in layers],
        "modules": [layer.module or layer.node for layer in layers],
        "grad": grad,
        "act": pos([layer.predicted.act_rms for layer in layers]),
        "grad_measured": pos([_layer_grad(m) if m else float("nan") for m in measured]),
        "act_measured": pos([m.act_rms if m else float("nan") for m in measured]),
        "measured": any(m is not None for m in measured),
        "reference": ref,
        "vanishing_below": None if ref is None else ref * 10**-BAND_DECADES,
        "exploding_above": None if ref is None else ref * 10**BAND_DECADES,
    }


def _layer_grad(m) -> float:
    """The layer gradient of a weight layer's moments (the per-element RMS where a report
    built without it carries none)."""
    return m.layer_grad if getattr(m, "layer_grad", None) is not None else m.grad_rms


def depth_chart(report: AuditReport) -> dict | None:
    """Geometry of the depth chart for ``templates/depth_chart.svg.j2``; ``None`` when
    there is nothing to draw (no weight layer with a positive finite value)."""
    data = series(report)
    if data is None:
        return None
    keys = ("grad", "act") + (("grad_measured", "act_measured") if data["measured"] else ())
    logs = [math.log10(v) for k in keys for v in data[k] if v == v]
    if not logs:
        return None
    lo, hi = min(logs), max(logs)
    ref = data["reference"]
    if ref is not None:
        lo, hi = min(lo, math.log10(ref) - BAND_DECADES), max(hi, math.log10(ref) + BAND_DECADES)
    lo, hi = lo - MARGIN_DECADES, hi + MARGIN_DECADES
    n = max(data["x"])

    def y(log_v: float) -> float:
        return round(BOTTOM - (log_v - lo) / (hi - lo) * (BOTTOM - TOP), 1)

    def x(i: int) -> float:
        return round(LEFT + (i - 0.5) / n * (RIGHT - LEFT), 1)

    def points(values: list[float]) -> list[list[tuple[float, float]]]:
        """Runs of consecutive drawable points (a NaN breaks the line)."""
        runs: list[list[tuple[float, float]]] = [[]]
        for i, v in zip(data["x"], values):
            if v == v:
                runs[-1].append((x(i), y(math.log10(v))))
            elif runs[-1]:
                runs.append([])
        return [r for r in runs if r]

    def tips(i: int) -> str:
        parts = [f"weight layer {data['x'][i]} ({data['modules'][i]})"]
        for key, what in (("grad", "layer gradient"), ("act", "activation RMS")):
            parts.append(f"{what} {_shown(data[key][i])}")
            if data["measured"]:
                parts.append(f"measured {_shown(data[key + '_measured'][i])}")
        return ", ".join(parts)

    lines = [
        {"key": "grad", "label": "layer gradient (predicted)", "colour": GRAD, "dash": False},
        {"key": "act", "label": "activation RMS (predicted)", "colour": ACT, "dash": True},
    ]
    for line in lines:
        line["runs"] = points(data[line["key"]])
    marks = []
    if data["measured"]:
        marks = [
            {"key": "grad_measured", "label": "layer gradient (measured)", "colour": GRAD, "shape": "cross"},
            {"key": "act_measured", "label": "activation RMS (measured)", "colour": ACT, "shape": "plus"},
        ]
        for mark in marks:
            mark["points"] = [p for run in points(data[mark["key"]]) for p in run]
    bands = []
    if ref is not None:
        lo_band, hi_band = math.log10(ref) - BAND_DECADES, math.log10(ref) + BAND_DECADES
        bands = [
            {"label": "vanishing band (\u2264 1e-3 \u00d7 last weight layer)", "colour": ACT,
             "top": y(lo_band), "bottom": BOTTOM},
            {"label": "exploding band (\u2265 1e3 \u00d7 last weight layer)", "colour": GRAD,
             "top": TOP, "bottom": y(hi_band)},
        ]
    legend = [{"kind": "band", **b} for b in bands] + [{"kind": "line", **ln} for ln in lines]
    legend += [{"kind": "mark", **m} for m in marks]
    for i, entry in enumerate(legend):
        entry["x"] = LEFT + (i % 2) * (RIGHT - LEFT) / 2
        entry["y"] = BOTTOM + 62 + (i // 2) * LEGEND_ROW
    height = BOTTOM + 62 + math.ceil(len(legend) / 2) * LEGEND_ROW
    return {
        "width": WIDTH,
        "height": round(height, 1),
        "left": LEFT, "right": RIGHT, "top": TOP, "bottom": BOTTOM,
        "title": "Layer gradient and activation RMS per weight layer",
        "x_label": "weight layer, in execution order (input \u2192 output)",
        "y_label": "RMS",
        "y_ticks": [{"y": y(k), "label": _decade(k)} for k in _decades(lo, hi)],
        "x_ticks": [{"x": x(i), "label": str(i)} for i in _layer_ticks(n)],
        "bands": bands,
        "lines": lines,
        "marks": marks,
        "dots": [
            {"x": x(i), "y": y(math.log10(g)), "tip": tips(k)}
            for k, (i, g) in enumerate(zip(data["x"], data["grad"])) if g == g
        ],
        "legend": legend,
    }


def _decades(lo: float, hi: float) -> list[int]:
    """Whole decades within [lo, hi], thinned to at most :data:`MAX_Y_TICKS` (multiples of a step)."""
    first, last = math.ceil(lo), math.floor(hi)
    step = max(1, math.ceil((last - first + 1) / MAX_Y_TICKS))
    return [k for k in range(first, last + 1) if k % step == 0]


def _layer_ticks(n: int) -> list[int]:
    """Every layer up to :data:`MAX_X_TICKS` layers; else 1 and the multiples of a round step."""
    if n <= MAX_X_TICKS:
        return list(range(1, n + 1))
    step = next(s for s in (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9) if n / s <= MAX_X_TICKS / 2)
    return [1] + list(range(step, n + 1, step))


def _decade(k: int) -> str:
    """``10^k`` as text: 1, 10, 10², 10⁻³."""
    return {0: "1", 1: "10"}.get(k, "10" + str(k).translate(_SUPERSCRIPT))


def _shown(v: float) -> str:
    return fmt_num(v) if v == v else "n/a"
