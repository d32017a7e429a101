"""Gradient and activation profiles: one number per weight layer, in execution order, as
the depth rules judge them (measured when the probe ran, else predicted)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradaudit.propagation import depth
from gradaudit.rules.evidence.attention import score_side
from gradaudit.rules.evidence.normalization import cut_off_by_degenerate_norms
from gradaudit.rules.evidence.structure import followed_by_norm, gate_side, trained

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis


def log10_ratio(a: float, b: float) -> float:
    if a <= 0 or b <= 0 or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf if a > b else -math.inf
    return math.log10(a / b)


def slope_per_layer(values: Iterable[float]) -> float | None:
    """Least-squares slope of log10(values) against layer index (decades per layer)."""
    pts = [(i, math.log10(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


#: The source of a profile predicted with the closed gates opened.
OPENED = "predicted with closed gates opened"


@dataclass
class GradientProfile:
    """The layer gradient G_l (:func:`gradaudit.propagation.depth.layer_gradient`) of each
    weight layer, in execution order, and where the numbers come from."""

    layers: list
    grads: list[float]
    #: "predicted", "measured" (the probe ran) or :data:`OPENED`
    source: str

    @property
    def summary(self) -> depth.DepthSummary:
        return depth.summarize(self.grads)

    @property
    def decades_per_layer(self) -> float:
        """Fitted change per layer moving toward the input (see ``propagation.depth``)."""
        return self.summary.decades_per_layer

    @property
    def end_to_end_decades(self) -> float:
        """log10(G_first / G_last)."""
        return self.summary.end_to_end_decades

    @property
    def group(self) -> int:
        """How many layers each end's median takes: a quarter of them, at least one."""
        return max(1, len(self.grads) // 4)

    @property
    def early(self) -> float:
        """Median G of the first :attr:`group` weight layers (nearest the input)."""
        return _median(self.grads[: self.group])

    @property
    def late(self) -> float:
        """Median G of the last :attr:`group` weight layers (nearest the output)."""
        return _median(self.grads[-self.group:])

    @property
    def change_decades(self) -> float:
        """How far, in decades, the gradient moves from the last weight layer to the
        first: log10(early / late) over the distance between the two quarters' centres
        (n - q layers), scaled to the model's n - 1 (a geometric profile gives exactly
        log10(G_first / G_last)). Vanishing and exploding gradients compound with depth;
        the medians of each quarter, not two single layers, keep one layer's structural
        dip (a projection after a LayerNorm over a large residual stream, a classifier on
        pooled features) from reading as a depth effect."""
        n, q = len(self.grads), self.group
        span = (n - 1) / (n - q) if n > q else 1.0
        return log10_ratio(self.early, self.late) * span

    @property
    def rate_text(self) -> str:
        s = self.decades_per_layer
        if abs(s) < depth.FLAT:
            return "the trend across layers is flat"
        return f"on average gradients {'fall' if s < 0 else 'grow'} 10x every {1 / abs(s):.1f} layers"


def _median(values: list[float]) -> float:
    xs = sorted(values)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


#: The name of a profile's quantity, and its definition, said in every message that quotes it.
GRADIENT_NAME = "weight-gradient scale"
GRADIENT_TERM = f"{GRADIENT_NAME} = sqrt(P) x RMS of dL/d(output), P positions sharing each weight"


def _finite_layers(analysis: Analysis) -> list | None:
    """The weight layers, or None when one of them lacks finite statistics (an
    incomplete prediction is reported by GA001, never judged)."""
    from gradaudit.propagation.coverage import finite_stats

    layers = analysis.weight_layers()
    if not all(finite_stats(analysis.stat(n.name)) for n in layers):
        return None
    return layers


def gradient_profile(
    analysis: Analysis, *, measured: bool = True, scale_free: bool = False
) -> GradientProfile | None:
    """The profile the vanishing/exploding rules judge.

    - the measured layer gradients when the probe ran (and ``measured``): the real model
      decides;
    - else, when the model has closed zero/small-initialised gates
      (:mod:`gradaudit.propagation.gates`), the prediction with the gates opened: the
      gradient that flows once the first updates open them;
    - else the prediction.

    Frozen layers never count (:func:`trained`): a frozen backbone under a trained head
    needs no gradient of its own. Layers whose gradient a normalization over one or two values cuts off (GA305: an
    artefact of the example batch) never count, nor do attention's query and key
    projections (:func:`score_side`: their gradient measures the attention's
    temperature, not depth), nor the layers of a squeeze-and-excitation gate
    (:func:`gate_side`: theirs measures the size of the map the gate scales). With
    ``scale_free`` only the weight
    layers whose output no normalization rescales
    (:func:`followed_by_norm`) count. A layer followed by BatchNorm/LayerNorm is
    scale-invariant: a large gradient grows its weight norm, which shrinks its next
    relative steps (Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch
    Normalization", ICLR 2019; Hoffer et al., NeurIPS 2018), so a large gradient there
    corrects itself, while a small one does not. That is why stock BatchNorm CNNs, whose
    first convolutions get 100-1000x the classifier's weight gradient, train: the
    exploding rule judges the scale-free profile, the vanishing rule every layer.

    None with fewer than two weight layers, an incomplete prediction, or a last layer
    that gets no gradient at all.
    """
    layers = _finite_layers(analysis)
    if layers is not None:
        cut = cut_off_by_degenerate_norms(analysis)
        layers = [
            n for n in trained(layers)
            if n.name not in cut and not score_side(analysis, n) and not gate_side(analysis, n)
            and not (scale_free and followed_by_norm(analysis, n))
        ]
    if layers is None or len(layers) < 2:
        return None
    probe = analysis.config.get("probe") if measured else None
    if probe is not None and not analysis.gates:
        rows = [probe.layers.get(n.name) for n in layers]
        if all(r is not None and r.draws and math.isfinite(r.grad_rms) for r in rows):
            grads = [depth.layer_gradient(n, r.grad_rms) for n, r in zip(layers, rows)]
            return _checked(GradientProfile(layers, grads, "measured"))
    source, basis = "predicted", analysis
    if analysis.gates and analysis.opened is not None:
        source, basis = OPENED, analysis.opened
    stats = [basis.stat(n.name) for n in layers]
    if any(s is None for s in stats):
        return None
    grads = [depth.layer_gradient(n, s.grad_rms) for n, s in zip(layers, stats)]
    return _checked(GradientProfile(layers, grads, source))


def layer_grad(analysis: Analysis, node: Node) -> float:
    """The predicted layer gradient G of ``node`` (the one quantity every message about a
    layer's gradient quotes; see :mod:`gradaudit.propagation.depth`)."""
    return depth.layer_gradient(node, analysis.stat(node.name).grad_rms)


def _checked(prof: GradientProfile) -> GradientProfile | None:
    last = prof.grads[-1]
    return prof if last > 0 and math.isfinite(last) else None


@dataclass
class ActivationProfile:
    """Activation RMS at the output of weight layers, in execution order (``source``:
    ``"predicted"`` or ``"measured"``)."""

    layers: list
    acts: list[float]
    source: str = "predicted"

    def rate_text(self, upto: int | None = None) -> str:
        s = slope_per_layer(self.acts[: (upto + 1) if upto is not None else None])
        if s is None or abs(s) < 1e-3:
            return "the trend across layers is flat"
        return f"at this rate activations {'grow' if s > 0 else 'shrink'} 10x every {1 / abs(s):.1f} layers"


def activation_profile(analysis: Analysis) -> ActivationProfile | None:
    """Activation RMS at each weight layer whose output no normalization rescales
    (:func:`followed_by_norm`): a norm restores the scale, so a small or large output
    there does not carry on to the next layers (Wav2Vec2's attention projections, N(0,
    0.02^2), summed into a Post-LN norm). The probe's measurement when it ran (the real
    model decides, as for the gradients); else the prediction, with closed gates opened
    (a zero head's output is 0 by design, not a collapse)."""
    layers = _finite_layers(analysis)
    if layers is not None:
        layers = [n for n in layers if not followed_by_norm(analysis, n)]
    if layers is None or len(layers) < 2:
        return None
    probe = analysis.config.get("probe")
    if probe is not None and not analysis.gates:
        rows = [probe.layers.get(n.name) for n in layers]
        if all(r is not None and r.draws and math.isfinite(r.act_rms) for r in rows):
            return ActivationProfile(layers, [r.act_rms for r in rows], "measured")
    basis = analysis.opened if analysis.gates and analysis.opened is not None else analysis
    stats = [basis.stat(n.name) for n in layers]
    if any(s is None for s in stats):
        return None
    return ActivationProfile(layers, [s.act_rms for s in stats])
