"""The gradient-over-time chart of the HTML report, as plain SVG geometry.

One chart per recurrent module call or unrolled loop
(:class:`gradaudit.propagation.recurrent.OverTime`): the RMS of dL/dx_t for a loss on
the last step only, relative to that step, against the number of steps back (0 = the
last step) on a log scale; the prediction as a line, the measurement (with ``--probe``)
as crosses; the vanishing band (<= 1e-3) and the exploding band (>= 1e3) shaded, and
the horizon of each curve (where it crosses a band) as a vertical mark.
``templates/time_chart.svg.j2`` writes the elements; every coordinate is formatted here
(one decimal), so the same report gives byte-identical SVG.
"""

from __future__ import annotations

import math
from typing import Any

from gradaudit.report.common import fmt_num

#: Decades from the last step's value to each band.
BAND_DECADES = 3.0
#: The lowest value drawn, in decades below the last step's (a measured curve keeps
#: falling to float32's floor long after it left the band).
FLOOR_DECADES = 9.0
MARGIN_DECADES = 0.3
#: At most this many measured crosses per chart (a long sequence is thinned evenly).
MAX_MARKS = 120

PRED = "#d9480f"
MEAS = "#1c7ed6"
VANISH = "#1c7ed6"
EXPLODE = "#d9480f"

WIDTH = 800
LEFT, RIGHT, TOP, BOTTOM = 62.0, 786.0, 12.0, 232.0
LEGEND_ROW = 20.0

_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _u(v: float) -> str:
    return f"{round(float(v), 1):g}"


def _logs_by_lag(values: list[float]) -> list[float]:
    """log10 of the curve by steps back (NaN where not drawable or below the floor)."""
    out = []
    for v in reversed(values):
        ok = isinstance(v, (int, float)) and v > 0 and math.isfinite(v) and math.log10(v) >= -FLOOR_DECADES
        out.append(math.log10(v) if ok else float("nan"))
    return out


def time_chart(record: Any) -> dict | None:
    """Geometry of one record's chart for ``templates/time_chart.svg.j2``; ``None`` when
    neither curve has a drawable point."""
    pred = _logs_by_lag(record.predicted.values)
    meas = _logs_by_lag(record.measured.values) if record.measured is not None else []
    finite = [v for v in pred + meas if v == v]
    if not finite:
        return None
    n = max(len(pred), len(meas))
    lo = min(min(finite), -BAND_DECADES) - MARGIN_DECADES
    hi = max(max(finite), 0.0) + MARGIN_DECADES
    if max(finite) > BAND_DECADES / 2:
        hi = max(hi, BAND_DECADES + MARGIN_DECADES)
    span = max(n - 1, 1)

    def x(k: float) -> float:
        return LEFT + k / span * (RIGHT - LEFT)

    def y(v: float) -> float:
        return BOTTOM - (v - lo) / (hi - lo) * (BOTTOM - TOP)

    runs: list[list[str]] = [[]]
    for k, v in enumerate(pred):
        if v == v:
            runs[-1].append(f"{_u(x(k))},{_u(y(v))}")
        elif runs[-1]:
            runs.append([])
    step = max(1, math.ceil(len(meas) / MAX_MARKS))
    marks = [{"x": _u(x(k)), "y": _u(y(v))} for k, v in enumerate(meas) if v == v and k % step == 0]
    bands = [{"label": "vanishing (\u2264 1e-3 \u00d7 the last step)", "colour": VANISH,
              "top": _u(y(-BAND_DECADES)), "height": _u(BOTTOM - y(-BAND_DECADES))}]
    if hi > BAND_DECADES:
        bands.append({"label": "exploding (\u2265 1e3 \u00d7 the last step)", "colour": EXPLODE,
                      "top": _u(TOP), "height": _u(y(BAND_DECADES) - TOP)})
    horizons = []
    for curve, what, colour in ((record.predicted, "predicted", PRED), (record.measured, "measured", MEAS)):
        if curve is not None and curve.horizon is not None and not curve.extrapolated and curve.horizon <= span:
            horizons.append({"x": _u(x(curve.horizon)), "colour": colour,
                             "tip": f"{what} horizon: {fmt_num(curve.horizon)} steps back"})
    legend = [{"kind": "band", **b} for b in bands]
    legend.append({"kind": "line", "label": "predicted", "colour": PRED})
    if meas:
        legend.append({"kind": "mark", "label": "measured (--probe)", "colour": MEAS})
    for i, entry in enumerate(legend):
        entry["x"] = _u(LEFT + (i % 2) * (RIGHT - LEFT) / 2)
        entry["y"] = _u(BOTTOM + 58 + (i // 2) * LEGEND_ROW)
        entry["x_text"] = _u(LEFT + (i % 2) * (RIGHT - LEFT) / 2 + 30)
    height = BOTTOM + 58 + math.ceil(len(legend) / 2) * LEGEND_ROW
    name = record.module or record.node
    return {
        "width": WIDTH, "height": _u(height),
        "left": _u(LEFT), "right": _u(RIGHT), "top": _u(TOP), "bottom": _u(BOTTOM),
        "plot_width": _u(RIGHT - LEFT), "mid_x": _u((LEFT + RIGHT) / 2), "mid_y": _u((TOP + BOTTOM) / 2),
        "title": f"Gradient over time of '{name}': RMS of dL/dx_t for a loss on the last step",
        "x_label": "steps back from the last step",
        "y_label": "RMS relative to the last step",
        "y_ticks": [{"y": _u(y(k)), "label": _decade(k), "x_text": _u(LEFT - 6)} for k in _decades(lo, hi)],
        "x_ticks": [{"x": _u(x(k)), "label": str(k)} for k in _lag_ticks(n)],
        "label_y": _u(BOTTOM + 16), "axis_label_y": _u(BOTTOM + 36), "tick_y": _u(BOTTOM + 4),
        "bands": bands,
        "runs": [" ".join(r) for r in runs if r],
        "marks": marks,
        "horizons": horizons,
        "legend": legend,
        "pred_colour": PRED, "meas_colour": MEAS,
    }


def _decades(lo: float, hi: float, most: int = 9) -> list[int]:
    first, last = math.ceil(lo), math.floor(hi)
    step = max(1, math.ceil((last - first + 1) / most))
    return [k for k in range(first, last + 1) if k % step == 0]


def _decade(k: int) -> str:
    """``10^k`` as text: 1, 10, 10², 10⁻³."""
    return {0: "1", 1: "10"}.get(k, "10" + str(k).translate(_SUPERSCRIPT))


def _lag_ticks(n: int) -> list[int]:
    """0 and multiples of a round step below ``n`` (at most about 20 ticks)."""
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9) if n / s <= 20)
    return list(range(0, n, step))
