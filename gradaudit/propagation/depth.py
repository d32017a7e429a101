"""How the gradient changes with depth: the one definition every report and rule uses.

**The layer gradient.** For a weight layer l with output y (positions p that share each
weight: the spatial positions of a convolution's output, the sequence positions of a
linear layer applied to (B, T, d); P = 1 in an MLP), the *layer gradient* is

    G_l = sqrt(P_l) * RMS(dL/dy_l)

the scale of dL/dW = sum_p (dL/dy_p) x_p^T per unit of input activation: dL/dW sums over
the P positions, so a global average pool, which divides each position's gradient by P,
does not read as a 1/P drop, while RMS(dL/dy), the per-element gradient of the per-layer
table, does. In an MLP the two coincide. The headline, GA101/GA102, GA202, the
per-layer table's ``layer grad`` column and the HTML chart all read G_l from
:func:`layer_gradient`; the summary below is computed from the same numbers.

Over the weight layers in execution order (depth 1 = nearest the input):

- ``decades_per_layer``: least-squares slope of log10(G_l) against -l, i.e. the change
  in decades per layer *moving toward the input*; negative means gradients shrink as
  they flow back (vanishing), positive means they grow (exploding). A per-layer gain
  chi (Schoenholz et al., ICLR 2017) gives 0.5 log10(chi) decades per layer.
- ``end_to_end_decades``: log10(G_first / G_last).
- ``spread_decades``: log10(max G / min G) over the weight layers.
- ``vanish_depth`` / ``explode_depth``: the depth, in weight layers from the output, at
  which the fitted trend would reach 1e-3 / 1e3 of the last layer's: 3 / |slope|. A
  property of the *rate*, not of this model: it may exceed the model's depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node

CROSSING_DECADES = 3.0
FLAT = 1e-3  # decades per layer below which the trend is reported as flat


def shared_positions(node: Node) -> int:
    """How many positions per sample share each weight of ``node``: spatial positions of a
    convolution's output, sequence positions of a linear layer applied to (B, T, d), the
    time steps of a recurrent module (whichever axis ``batch_first`` puts them on), the
    rows a mixture of experts routes to each expert (S rows over E experts: S / E, the
    even routing the propagation assumes; the rows of all samples together, as the
    grouped product's input does not say which sample a row came from)."""
    shape = node.shape
    if node.op == "grouped_mm" and shape and node.params.get("weight") is not None:
        return max(shape[0] // max(node.params["weight"].shape[0], 1), 1)
    if node.op in ("rnn", "lstm", "gru") and shape:  # the time steps: (T, B, H), (B, T, H) or (T, H)
        return max(shape[1] if len(shape) == 3 and getattr(node.fn, "batch_first", False) else shape[0], 1)
    if not shape or len(shape) < 3:
        return 1
    if node.op in ("conv", "conv_transpose"):
        return max(math.prod(shape[2:]), 1)
    return max(math.prod(shape[1:-1]), 1)


def layer_gradient(node: Node, grad_rms: float) -> float:
    """G_l = sqrt(P) * RMS(dL/dy) for ``node`` (see the module docstring)."""
    return grad_rms * math.sqrt(shared_positions(node))


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

    @property
    def end_to_end_ratio(self) -> float:
        """G_first / G_last as a number (0 or inf when a layer gets exactly nothing)."""
        d = self.end_to_end_decades
        if not math.isfinite(d):
            return 0.0 if d < 0 else math.inf
        return 10.0 ** max(min(d, 300.0), -300.0)

    def to_json(self) -> dict:
        """Floats with 6 significant digits, as every number of the JSON report (not a
        fixed number of decimals, which would leave a small value 2 digits)."""
        out = {}
        for k, v in {**self.__dict__, "layers_per_decade": self.layers_per_decade}.items():
            out[k] = float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v
        return out


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 and math.isfinite(x) else (-math.inf if x == 0 else math.nan)


def slope(logs: Sequence[float]) -> float:
    """Least-squares slope of ``logs`` (log10 of G_l, execution order) against -depth,
    over the finite values; 0 with fewer than two."""
    pts = [(-(i + 1), v) for i, v in enumerate(logs) if math.isfinite(v)]
    if len(pts) < 2:
        return 0.0
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else 0.0


def summarize(layer_grads: Sequence[float]) -> DepthSummary:
    """Depth summary from the layer gradients G_l of the weight layers, in order."""
    logs = [_log10(r) for r in layer_grads]
    finite = [v for v in logs if math.isfinite(v)]
    n = len(layer_grads)
    rate = slope(logs)
    spread = (max(finite) - min(finite)) if finite else 0.0
    if finite and any(r == 0 for r in layer_grads):
        spread = math.inf
    end = (logs[0] - logs[-1]) if n >= 2 else 0.0
    vanish = CROSSING_DECADES / -rate if rate < -FLAT else None
    explode = CROSSING_DECADES / rate if rate > FLAT else None
    return DepthSummary(n, spread, rate, end, vanish, explode)
