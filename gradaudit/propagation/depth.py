"""How the predicted gradient changes with depth, and where it crosses 1e-3 / 1e3.

Over the weight layers in execution order (depth 1 = nearest the input), with r_l the
predicted RMS of dL/d(output of layer l):

- ``decades_per_layer``: least-squares slope of log10(r_l) against -l, i.e. the change
  in decades per layer *moving toward the input*; negative means gradients shrink as
  they flow back (vanishing), positive means they grow (exploding). A per-layer gain
  chi (Schoenholz et al. 2017) gives 0.5 log10(chi) decades per layer.
- ``end_to_end_decades``: log10(r_first / r_last).
- ``spread_decades``: log10(max r / min r) over every parameterized layer.
- ``vanish_depth`` / ``explode_depth``: the depth, in weight layers from the output, at
  which the gradient reaches 1e-3 / 1e3 of the last layer's at the fitted rate:
  3 / |decades_per_layer|. Extrapolated when the model is shallower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CROSSING_DECADES = 3.0
FLAT = 1e-3  # decades per layer below which the trend is reported as flat


@dataclass
class DepthSummary:
    n_layers: int
    spread_decades: float
    decades_per_layer: float
    end_to_end_decades: float
    vanish_depth: float | None
    explode_depth: float | None

    @property
    def layers_per_decade(self) -> float | None:
        if abs(self.decades_per_layer) < FLAT:
            return None
        return 1.0 / abs(self.decades_per_layer)

    def to_json(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = None if v is None else (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
        lpd = self.layers_per_decade
        out["layers_per_decade"] = None if lpd is None else round(lpd, 4)
        return out


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 and math.isfinite(x) else (-math.inf if x == 0 else math.nan)


def summarize(weight_grad_rms: list[float], all_grad_rms: list[float]) -> DepthSummary:
    """Depth summary from the grad RMS of weight layers (in order) and of all layers."""
    logs = [_log10(r) for r in weight_grad_rms]
    finite = [(i + 1, v) for i, v in enumerate(logs) if math.isfinite(v)]
    n = len(weight_grad_rms)
    slope = 0.0
    if len(finite) >= 2:
        xs = [-d for d, _ in finite]
        ys = [v for _, v in finite]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    all_logs = [v for v in (_log10(r) for r in all_grad_rms) if math.isfinite(v)]
    spread = (max(all_logs) - min(all_logs)) if all_logs else 0.0
    if any(r == 0 for r in all_grad_rms) and all_logs:
        spread = math.inf
    end = (logs[0] - logs[-1]) if n >= 2 else 0.0
    vanish = CROSSING_DECADES / -slope if slope < -FLAT else None
    explode = CROSSING_DECADES / slope if slope > FLAT else None
    return DepthSummary(n, spread, slope, end, vanish, explode)
