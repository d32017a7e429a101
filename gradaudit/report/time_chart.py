"""The gradient-over-time chart of the HTML report, as plain SVG geometry.

One chart per recurrent module call or unrolled loop
(:class:`gradaudit.propagation.over_time.OverTime`): the RMS of dL/dx_t for a loss on
the last step only, relative to that step, against the number of steps back (0 = the
last step) on a log scale; the prediction as a line, the measurement (with ``--probe``)
as crosses; the vanishing band (<= 1e-3) and the exploding band (>= 1e3) shaded, and
the horizon of each curve (where it crosses a band) as a vertical mark.
``templates/time_chart.svg.j2`` writes the elements, in the style of the depth chart
(:mod:`gradaudit.report.charts`, whose scales and tick labels it shares).
"""

from __future__ import annotations

import math
from typing import Any

from gradaudit.report.charts import ACT, BAND_DECADES, GRAD, LEGEND_ROW, MARGIN_DECADES, WIDTH, _decade, _decades
from gradaudit.report.common import fmt_num

#: The lowest value drawn, in decades below the last step's (a measured curve keeps
#: falling to float32's floor long after it left the band).
FLOOR_DECADES = 9.0
#: At most this many measured crosses per chart (a long sequence is thinned evenly).
MAX_MARKS = 120
#: The prediction in the gradient colour, the measurement in the other one.
PRED, MEAS = GRAD, ACT
LEFT, RIGHT, TOP, BOTTOM = 62.0, 786.0, 12.0, 232.0


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

    runs: list[list[tuple[float, float]]] = [[]]
    for k, v in enumerate(pred):
        if v == v:
            runs[-1].append((x(k), y(v)))
        elif runs[-1]:
            runs.append([])
    step = max(1, math.ceil(len(meas) / MAX_MARKS))
    marks = [(x(k), y(v)) for k, v in enumerate(meas) if v == v and k % step == 0]
    bands = [{"label": "vanishing (\u2264 1e-3 \u00d7 the last step)", "colour": ACT,
              "top": y(-BAND_DECADES), "bottom": BOTTOM}]
    if hi > BAND_DECADES:
        bands.append({"label": "exploding (\u2265 1e3 \u00d7 the last step)", "colour": GRAD,
                      "top": TOP, "bottom": y(BAND_DECADES)})
    horizons = []
    for curve, what, colour in ((record.predicted, "predicted", PRED), (record.measured, "measured", MEAS)):
        if curve is not None and curve.horizon is not None and not curve.extrapolated and curve.horizon <= span:
            horizons.append({"x": x(curve.horizon), "colour": colour,
                             "tip": f"{what} horizon: {fmt_num(curve.horizon)} steps back"})
    legend = [{"kind": "band", **b} for b in bands]
    legend.append({"kind": "line", "label": "predicted", "colour": PRED})
    if meas:
        legend.append({"kind": "mark", "label": "measured (--probe)", "colour": MEAS})
    for i, entry in enumerate(legend):
        entry["x"] = LEFT + (i % 2) * (RIGHT - LEFT) / 2
        entry["y"] = BOTTOM + 58 + (i // 2) * LEGEND_ROW
    name = record.module or record.node
    return {
        "width": WIDTH,
        "height": BOTTOM + 58 + math.ceil(len(legend) / 2) * LEGEND_ROW,
        "left": LEFT, "right": RIGHT, "top": TOP, "bottom": BOTTOM,
        "title": f"Gradient over time of '{name}': RMS of dL/dx_t for a loss on the last step",
        "x_label": "steps back from the last step",
        "y_label": "RMS relative to the last step",
        "y_ticks": [{"y": y(k), "label": _decade(k)} for k in _decades(lo, hi)],
        "x_ticks": [{"x": x(k), "label": str(k)} for k in _lag_ticks(n)],
        "bands": bands,
        "runs": [r for r in runs if r],
        "marks": marks,
        "horizons": horizons,
        "legend": legend,
        "pred_colour": PRED,
        "meas_colour": MEAS,
    }


def _lag_ticks(n: int) -> list[int]:
    """0 and multiples of a round step below ``n`` (at most about 20 ticks)."""
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9) if n / s <= 20)
    return list(range(0, n, step))
