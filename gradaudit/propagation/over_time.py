"""Recurrent layers over time: the gradient of a loss on the last step, at every step.

With a gradient only at the last step (L = <h_T, g>, the top layer's forward direction
of a recurrent module, or the last call of an unrolled loop of cells), the RMS of
dL/dx_t at every step t is the *gradient-over-time curve*. Its *per-step gain* is the
geometric mean of the ratio between successive steps back to the horizon, and its
*horizon* the number of steps back after which the curve falls below 1e-3 (vanishing)
or rises above 1e3 (exploding) of its value at the last step, extrapolated at the
curve's own late rate when the sequence is shorter (Bengio, Simard & Frasconi 1994: the
gradient of a long-range dependency decays exponentially; Pascanu, Mikolov & Bengio
2013 bound the rate by the recurrent weights' largest singular value). The same is read
from the RMS of dL/dh_t, the total gradient at the hidden state of that direction
(``OverTime.predicted_h``).

The curve is computed by :func:`simulate`: backpropagation through time on probe
vectors, with the real recurrent matrices and gate values drawn from the forward
statistics of :mod:`gradaudit.propagation.recurrent`. The per-unit second-moment
recursion of that module treats W_hh as drawn afresh at every step; over many steps the
same W_hh makes the gradient align with the leading eigenvectors of the mean Jacobian,
which one number per unit cannot carry (see :func:`simulate`). That recursion's own
stationary per-step gain (``mean_field_gain``: RMS singular value times the gates'
factors, at the forward fixed point) is reported beside the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradaudit.ir import Node
from gradaudit.propagation.recurrent import (
    CELL_OPS, Direction, Stack, Step, Weights, block_sigmas, family, layer_weights, stationary_gain,
)

#: A curve crossing 1e-3 / 1e3 of its last-step value (AUTOTRAINER's ratio; DESIGN.md).
HORIZON_DECADES = 3.0


# --------------------------------------------------------------------------- the sampled pass
#: Probe vectors of the over-time backward pass (:func:`simulate`), its compute budget
#: in multiply-adds, and the seed of its draws.
PROBES = 32
#: Probe vectors times hidden units wanted per step (narrow layers get more probes).
SAMPLES = 8192
BUDGET = 1.0e9
SEED = 19941997


def _draw(pair: tuple[torch.Tensor, torch.Tensor], m: int, gen: torch.Generator) -> torch.Tensor:
    mean, var = pair
    z = torch.randn(mean.numel(), m, generator=gen, dtype=torch.float32)
    return mean.float().unsqueeze(1) + var.clamp_min(0.0).sqrt().float().unsqueeze(1) * z


def sample_back(fam: str, w_ih: torch.Tensor, w_hh: torch.Tensor, s: Step, dh: torch.Tensor, dc: torch.Tensor | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step of real backpropagation through time for m probe vectors (columns of
    ``dh`` (H, m), the gradient at h_t, and ``dc``, the gradient reaching c_t from step
    t+1), with the step's gate values drawn per unit and probe from the Gaussians of the
    forward statistics (``s.dist``). The recurrent matrices are the real ones, the same
    at every step. Returns the gradients at h_{t-1}, x_t and c_{t-1} (float32)."""
    H = dh.shape[0]
    m = dh.shape[1]
    if fam in ("rnn_tanh", "rnn_relu"):
        a = _draw(s.dist["a"], m, gen)
        d = 1 - torch.tanh(a) ** 2 if fam == "rnn_tanh" else (a > 0).float()
        da = d * dh
        return w_hh.t() @ da, w_ih.t() @ da, None
    if fam == "lstm":
        a = _draw(s.dist["a"], m, gen)
        i, f, o = torch.sigmoid(a[:H]), torch.sigmoid(a[H : 2 * H]), torch.sigmoid(a[3 * H :])
        g = torch.tanh(a[2 * H : 3 * H])
        c_prev = _draw(s.dist["c_prev"], m, gen)
        tc = torch.tanh(f * c_prev + i * g)
        k = dh * o * (1 - tc * tc)
        if dc is not None:
            k = k + dc
        da = torch.cat([k * g * i * (1 - i), k * c_prev * f * (1 - f), k * i * (1 - g * g), dh * tc * o * (1 - o)])
        return w_hh.t() @ da, w_ih.t() @ da, f * k
    a = _draw(s.dist["a"], m, gen)  # GRU
    r, z = torch.sigmoid(a[:H]), torch.sigmoid(a[H:])
    u = _draw(s.dist["u"], m, gen)
    n = torch.tanh(_draw(s.dist["xn"], m, gen) + r * u)
    h_prev = _draw(s.dist["h_prev"], m, gen)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * u * r * (1 - r)
    return z * dh + w_hh.t() @ torch.cat([dr, dz, dn * r]), w_ih.t() @ torch.cat([dr, dz, dn]), None


def _sample_direction(fam: str, w: Weights, steps: list[Step], inject: torch.Tensor, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled BPTT through ``steps`` (processing order) with ``inject`` (K, H, m) added
    to each step's h_t. Returns dL/dx per step (K, n_in, m) and E[(dL/dh_t)^2] (K,).
    Stops once the gradient has fallen 12 decades (in second moment) below its peak
    with nothing left to inject."""
    K, H, m = inject.shape
    w_ih, w_hh = w.w_ih.float(), w.w_hh.float()
    dx = torch.zeros(K, w_ih.shape[1], m)
    h2 = torch.zeros(K, dtype=torch.float64)
    fed = (inject.abs().sum(dim=(1, 2)) > 0).tolist()
    first_fed = min((p for p, f in enumerate(fed) if f), default=K)
    carry_h = torch.zeros(H, m)
    carry_c = torch.zeros(H, m) if fam == "lstm" else None
    peak = 0.0
    for p in range(K - 1, -1, -1):
        dh = inject[p] + carry_h
        size = float(dh.pow(2).sum()) + (float(carry_c.pow(2).sum()) if carry_c is not None else 0.0)
        peak = max(peak, size)
        if p <= first_fed and size <= 1e-12 * peak:
            break
        h2[p] = float(dh.double().pow(2).mean())
        carry_h, dx[p], carry_c = sample_back(fam, w_ih, w_hh, steps[p], dh, carry_c, gen)
    return dx, h2


def simulate(stack: Stack, probes: int = PROBES, budget: float = BUDGET, seed: int = SEED
             ) -> tuple[list[float], list[float]]:
    """The predicted gradient-over-time curve of a module: a cotangent g ~ N(0, I) at the
    last step of the top layer's forward direction only, carried back through every
    layer and direction by :func:`sample_back` on ``probes`` probe vectors (more for a
    layer narrower than ``SAMPLES / probes`` units; fewer when the budget says so; inter-layer
    dropout as random inverted masks). Returns, for the last K steps in time order, the
    RMS of dL/dx_t over the bottom input's elements and of dL/dh_t of the top forward
    direction, each relative to the last step; K is T or less when the budget (``probes``
    x K x the multiply-adds of one step of every layer) does not allow all of T.

    Why sample: the second-moment recursion of :func:`back` keeps one number per unit
    and so treats W_hh as drawn afresh at every step (the mean-field assumption). With
    the same W_hh at every step and a gate path that is not zero on average (the LSTM's
    forget gate, the GRU's update gate), the gradient aligns with the eigenvectors of the
    mean Jacobian E[J_t] of largest modulus and decays more slowly than that recursion
    says (measured at PyTorch's default LSTM init: 0.61 per step against 0.54). The probe
    vectors carry those correlations exactly; the gate values are drawn independently
    per step from the forward statistics, the remaining mean-field assumption.
    """
    cost = sum(2 * d.weights.w_hh.shape[0] * (d.weights.hidden + d.weights.w_ih.shape[1])
               for dirs in stack.layers for d in dirs)
    hidden = min(d.weights.hidden for dirs in stack.layers for d in dirs)
    wanted = max(probes, min(16 * probes, -(-SAMPLES // hidden)))  # narrow layers: more probes
    m = int(max(4, min(wanted, budget // (16 * cost))))
    K = int(min(stack.T, max(16, budget // (m * cost))))
    gen = torch.Generator().manual_seed(seed)
    above: torch.Tensor | None = None
    top_h2 = None
    for layer in range(len(stack.layers) - 1, -1, -1):
        total = None
        for d, dr in enumerate(stack.layers[layer]):
            H = dr.weights.hidden
            if above is None:
                inj = torch.zeros(K, H, m)
                if d == 0:
                    inj[-1] = torch.randn(H, m, generator=gen)
            else:
                inj = above[:, d * H : (d + 1) * H, :]
            if d == 0:
                steps = dr.steps[stack.T - K :]
            else:  # processing order runs backward in time: the window is its first K steps
                steps, inj = dr.steps[:K], inj.flip(0)
            dx, h2 = _sample_direction(stack.fam, dr.weights, steps, inj.contiguous(), gen)
            if d == 1:
                dx = dx.flip(0)
            if above is None and d == 0:
                top_h2 = h2
            total = dx if total is None else total + dx
        if layer > 0 and stack.dropout > 0:
            keep = (torch.rand(total.shape, generator=gen) >= stack.dropout).float()
            total = total * keep / (1 - stack.dropout)
        above = total
    x2 = above.double().pow(2).mean(dim=(1, 2))
    return _relative(x2), _relative(top_h2)


def _relative(sq: torch.Tensor) -> list[float]:
    """RMS relative to the last entry, for a vector of second moments."""
    rms = sq.clamp_min(0).sqrt()
    last = float(rms[-1])
    return [float(v) / last if last > 0 else 0.0 for v in rms]


# --------------------------------------------------------------------------- curves
@dataclass
class Curve:
    """A gradient-over-time curve: ``values[t]`` is the RMS of dL/dx_t relative to the
    last step's (t = 0 .. T-1), and what it says."""

    values: list[float]
    gain: float | None  # geometric-mean ratio per step, back in time
    horizon: float | None  # steps back to 1e-3 (or 1e3) of the last step's value
    direction: str  # "vanishing", "exploding" or "flat"
    extrapolated: bool = False

    def to_json(self) -> dict:
        return {"values": [_num(v) for v in self.values], "per_step_gain": _num(self.gain),
                "horizon": _num(self.horizon), "direction": self.direction, "extrapolated": self.extrapolated}


def _num(x):
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return float(f"{x:.6g}")


def lags(values: list[float]) -> list[float]:
    """log10 of the curve relative to its last step, by lag k = 0, 1, ... (k steps back)."""
    last = values[-1]
    out = []
    for v in reversed(values):
        out.append(math.log10(v / last) if v > 0 and last > 0 else -math.inf)
    return out


def crossing(logs: list[float], decades: float = HORIZON_DECADES) -> tuple[float, int] | None:
    """The first (fractional, log-linear) lag at which |log10| reaches ``decades``, and
    its sign; None when the curve stays inside."""
    for k in range(1, len(logs)):
        v = logs[k]
        if abs(v) >= decades:
            sign = 1 if v > 0 else -1
            prev = logs[k - 1]
            target = sign * decades
            if not math.isfinite(v) or v == prev:
                return float(k), sign
            return (k - 1) + (target - prev) / (v - prev), sign
    return None


def fitted_gain(logs: list[float], upto: int) -> float | None:
    """Geometric-mean ratio per step from lag 1 to lag ``upto`` (10^slope)."""
    upto = min(upto, len(logs) - 1)
    if upto < 2 or not (math.isfinite(logs[1]) and math.isfinite(logs[upto])):
        return None
    return 10 ** ((logs[upto] - logs[1]) / (upto - 1))


def describe(values: list[float], tail_gain: float | None = None) -> Curve:
    """Per-step gain, horizon and direction of a curve. ``tail_gain`` (the stationary
    gain, or the measured tail's) extrapolates the horizon past the sequence."""
    logs = lags(values)
    T = len(values)
    cross = crossing(logs)
    if cross is not None:
        horizon, sign = cross
        upto = max(2, min(T - 1, math.ceil(horizon)))
        return Curve(values, fitted_gain(logs, upto), horizon, "vanishing" if sign < 0 else "exploding")
    gain = fitted_gain(logs, T - 1)
    tail = tail_gain if tail_gain is not None else gain
    end = logs[-1] if math.isfinite(logs[-1]) else None
    if tail is None or end is None or tail <= 0 or abs(math.log10(tail)) < 1e-4:
        return Curve(values, gain, None, "flat")
    slope = math.log10(tail)
    target = -HORIZON_DECADES if slope < 0 else HORIZON_DECADES
    horizon = (T - 1) + (target - end) / slope
    return Curve(values, gain, horizon, "vanishing" if slope < 0 else "exploding", extrapolated=True)


def tail_gain(values: list[float]) -> float | None:
    """The per-step ratio over the second half of the lags (past the last-step
    transient): what a measured curve extrapolates with."""
    logs = lags(values)
    n = len(logs)
    if n < 4:
        return None
    a, b = n // 2, n - 1
    if not (math.isfinite(logs[a]) and math.isfinite(logs[b])):
        return None
    return 10 ** ((logs[b] - logs[a]) / (b - a))


@dataclass
class OverTime:
    """The predicted behaviour of one recurrent module (or chain of cell calls) over time."""

    node: str  # the module call (the last call of a cell chain)
    module: str | None
    op: str
    family: str
    steps: int
    #: Over the last steps of the sequence (all of them unless the budget of
    #: :func:`simulate` cut the window), in time order.
    predicted: Curve
    #: E[(dL/dh_t)^2]^(1/2) of the top layer's forward direction, relative to the last
    #: step (the total gradient at the hidden state h_t, through the recurrence): its
    #: horizon is the number of steps back after which dL/dh_t falls below 1e-3 (or
    #: rises above 1e3) of its last-step value.
    predicted_h: Curve
    #: The per-step RMS gain of the second-moment (mean-field) recursion at the
    #: stationary state: rms singular value x gate factors (module docstring).
    mean_field_gain: float
    gates: dict[str, float]
    #: Largest singular value over the gate blocks of W_hh and their RMS singular value
    #: (the top layer's forward direction).
    sigma_max: float
    sigma_rms: float
    nodes: list[str] = field(default_factory=list)  # the calls of a cell chain, in order
    location: dict | None = None  # the user's source line of the call
    module_type: str | None = None
    measured: Curve | None = None

    def to_json(self) -> dict:
        out = {
            "node": self.node, "module": self.module, "module_type": self.module_type, "op": self.op,
            "family": self.family, "steps": self.steps, "location": self.location,
            "mean_field_gain": _num(self.mean_field_gain), "sigma_max": _num(self.sigma_max),
            "sigma_rms": _num(self.sigma_rms), "gates": {k: _num(v) for k, v in self.gates.items()},
            "predicted": self.predicted.to_json(), "predicted_h": self.predicted_h.to_json(),
            "measured": self.measured.to_json() if self.measured is not None else None,
        }
        if self.nodes:
            out["calls"] = list(self.nodes)
        return out


def _singular(w: Weights, fam: str) -> tuple[float, float]:
    """The largest singular value over the gate blocks of W_hh, and the RMS singular
    value sqrt(||W_k||_F^2 / H) over them."""
    return max(s for _, _, s in block_sigmas(w.w_hh, fam)), math.sqrt(float(w.s_hh.sum()) / w.w_hh.shape[0])



def over_time_of(stack: Stack, node: Node) -> OverTime:
    """The over-time prediction of a module call: the sampled curve (:func:`simulate`),
    its per-step gain and horizon, the mean-field per-step gain of the top layer's
    forward direction at its stationary state, its gates and singular values."""
    first = stack.layers[-1][0]
    x_curve, h_curve = simulate(stack)
    return _over_time(node, stack.fam, stack.T, first.weights, first.steps[-1], x_curve, h_curve)


def _over_time(node: Node, fam: str, T: int, w: Weights, last: Step, x_curve: list[float], h_curve: list[float],
               calls: list[str] | None = None) -> OverTime:
    x_curve, h_curve = _trim(x_curve), _trim(h_curve)
    sig_max, sig_rms = _singular(w, fam)
    return OverTime(
        node=node.name, module=node.module, op=node.op, family=fam, steps=T,
        predicted=describe(x_curve, tail_gain(x_curve)), predicted_h=describe(h_curve, tail_gain(h_curve)),
        mean_field_gain=stationary_gain(w, last), gates=dict(last.gates), sigma_max=sig_max, sigma_rms=sig_rms,
        nodes=list(calls or []), location=node.location.to_json() if node.location else None,
        module_type=node.module_type,
    )


def _trim(values: list[float]) -> list[float]:
    """The curve from its first nonzero entry (the sampled pass stops early once the
    gradient is negligible)."""
    for k, v in enumerate(values):
        if v > 0:
            return values[k:]
    return values[-1:]


# --------------------------------------------------------------------------- the analysis
#: Ops a cell's state passes through unchanged between two calls of a loop.
_PASS = frozenset({"getitem", "identity", "clone", "contiguous", "to", "view", "reshape", "dropout", "detach"})


def _producer(analysis, ref: tuple[str, int] | None, op: str, module: str | None) -> str | None:
    """The call of cell ``module`` whose output ``ref`` is (through getitem, copies and
    dropout), or None."""
    seen = 0
    while ref is not None and seen < 16:
        node = analysis.graph[ref[0]]
        if node.op == op and node.module == module:
            return node.name
        if node.op not in _PASS or not node.inputs:
            return None
        ref = (node.inputs[0], 0)
        seen += 1
    return None


def cell_chains(analysis) -> list[list[Node]]:
    """Calls of the same cell where each call's state is the previous call's output: the
    loops over time the capture unrolled, in order (two or more calls)."""
    chains: dict[str, list[Node]] = {}
    out: list[list[Node]] = []
    for node in analysis.graph:
        if node.op not in CELL_OPS or "step" not in analysis.effect_info(node.name):
            continue
        h_ref = analysis.effect_info(node.name)["state_refs"][0]
        prev = _producer(analysis, h_ref, node.op, node.module)
        chain = chains.get(prev) if prev is not None else None
        if chain is None:
            chain = [node]
            out.append(chain)
        else:
            chain.append(node)
        chains[node.name] = chain
    return [c for c in out if len(c) > 1]


def time_steps(analysis) -> frozenset[str]:
    """The cell calls that are earlier time steps of an unrolled loop (all but the last
    call of each chain): not layers of depth."""
    cached = analysis.config.get("time_steps")
    if cached is None:
        cached = frozenset(n.name for chain in cell_chains(analysis) for n in chain[:-1])
        analysis.config["time_steps"] = cached
    return cached


def over_time(analysis) -> list[OverTime]:
    """The over-time prediction of every recurrent module call and every unrolled loop of
    cell calls (cached in ``analysis.config``)."""
    cached = analysis.config.get("over_time")
    if cached is not None:
        return cached
    out: list[OverTime] = []
    for node in analysis.graph:
        stack = analysis.effect_info(node.name).get("stack")
        if stack is not None:
            out.append(over_time_of(stack, node))
    for chain in cell_chains(analysis):
        out.append(_chain_over_time(chain, analysis))
    analysis.config["over_time"] = out
    return out


def _chain_over_time(chain: list[Node], analysis) -> OverTime:
    """:func:`simulate` for an unrolled loop: one direction whose steps are the calls."""
    last = chain[-1]
    fam = family(last.fn)
    w = layer_weights(last.fn, cell=True)
    steps = [analysis.effect_info(n.name)["step"] for n in chain]
    stack = Stack(fam, [[Direction(w, steps)]], len(steps), 0.0)
    x_curve, h_curve = simulate(stack)
    return _over_time(last, fam, len(steps), w, steps[-1], x_curve, h_curve, calls=[n.name for n in chain])
