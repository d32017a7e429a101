"""Recurrent layers over time: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells.

A recurrent layer is one weight layer applied T times. Its moments are propagated step
by step through time with the weights the user initialised, per hidden unit, under the
mean-field assumptions of the rest of the engine (Poole et al. 2016; Schoenholz et al.,
ICLR 2017): every pre-activation is Gaussian across samples, units are independent, and
the gradient is independent of the forward values (gradient independence). With
``S = W * W`` (elementwise squares) and per-unit vectors:

**Forward** (one step, per gate block k; x and h_{t-1} independent):

    E[a_k] = W_ih,k E[x] + b_ih,k + W_hh,k E[h] + b_hh,k
    Var[a_k] = S_ih,k Var[x] + S_hh,k Var[h]

Gate expectations are Gaussian integrals on a fine grid
(:func:`gradaudit.propagation.moments.channel_points`); ReLU's are closed forms.

- RNN (Elman 1990): h_t = phi(a), phi = tanh or ReLU.
- LSTM (Hochreiter & Schmidhuber 1997; the forget gate of Gers et al. 2000), torch's
  gate order i, f, g, o: c_t = f c_{t-1} + i g, h_t = o tanh(c_t), with f, c_{t-1}, i,
  g independent: E[c_t] = E[f] E[c] + E[i] E[g], E[c_t^2] = E[f^2] E[c^2] +
  2 E[f] E[c] E[i] E[g] + E[i^2] E[g^2]; c_t taken as Gaussian for tanh(c_t).
- GRU (Cho et al. 2014), torch's order r, z, n: n = tanh(W_in x + b_in + r (W_hn h +
  b_hn)), h_t = (1 - z) n + z h_{t-1}.

**Backward** (backpropagation through time, Werbos 1990). P_t = E[(dL/dh_t)^2] per unit
(everything reaching h_t: the output's own gradient plus what comes back from step t+1),
Q_t = E[(dL/dc_t)^2] arriving from step t+1 (LSTM). Each step is linear in (P_t, Q_t):

- RNN: dL/da = phi'(a) dL/dh, so with d2 = E[phi'(a)^2]:
  P_{t-1} <- S_hh^T (d2 P_t),  E[(dL/dx_t)^2] = S_ih^T (d2 P_t).
  With W_hh = r x orthogonal, S_hh^T has row sums r^2: per step the gradient's second
  moment is multiplied by r^2 E[phi'^2], the mean-field form of Pascanu, Mikolov &
  Bengio (2013)'s ||W_hh^T diag(phi')||, whose bound sigma_max gamma < 1 is sufficient
  for vanishing (gamma = max |phi'|).
- LSTM: the cell gradient K = Q_t + E[o^2] E[tanh'(c_t)^2] P_t goes back through the
  forget gate alone, Q_{t-1} = E[f^2] K (the constant error carousel, Hochreiter &
  Schmidhuber 1997: the gradient over time lives while f stays near 1, hence the
  forget-gate bias of 1 of Gers et al. 2000 and Jozefowicz et al. 2015), and through
  the gates: E[(dL/da_i)^2] = E[g^2] E[s'(a_i)^2] K, E[(dL/da_f)^2] = E[c_{t-1}^2]
  E[s'(a_f)^2] K, E[(dL/da_g)^2] = E[i^2] E[tanh'(a_g)^2] K, E[(dL/da_o)^2] =
  E[tanh(c_t)^2] E[s'(a_o)^2] P_t; P_{t-1} <- S_hh^T (those four, stacked), and the
  same with S_ih into x_t.
- GRU: P_{t-1} <- E[z^2] P_t + S_hz^T (E[(h - n)^2] E[s'(a_z)^2] P_t) + S_hn^T (E[r^2]
  D_n) + S_hr^T (E[u^2] E[s'(a_r)^2] D_n), with D_n = E[(1 - z)^2] E[tanh'(a_n)^2] P_t
  and u = W_hn h + b_hn.

Cross terms between gate blocks vanish in expectation over independent weight rows.
These recursions give the op's forward statistics and its backward gains (a gradient at
every step of the output, and at h_n / c_n). Limit: a stacked layer's input (the layer
below's output) is correlated over time and with the layer's own state, which the
recursion treats as independent; measured on a 2-layer GRU at PyTorch's default init,
the top layer's output RMS is 14% and the input gradient 18% below real autograd. In an
unrolled loop of cell calls, the gradient the engine gives each call (the per-layer
table) comes from this recursion too, so calls far from the last are predicted too small
by the factor the over-time curve corrects (a 40-call LSTMCell loop at PyTorch's
default init: about 300x at the first call); the probe's GA607 names them.

The gradient over time of a loss on the last step, its per-step gain and horizon, are
:mod:`gradaudit.propagation.over_time`'s; they use the forward statistics computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.moments import channel_points
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles, make_stats

#: Gates per family, in torch's row order of the stacked weights, and their nonlinearity.
GATES = {
    "lstm": (("input", "sigmoid"), ("forget", "sigmoid"), ("cell", "tanh"), ("output", "sigmoid")),
    "gru": (("reset", "sigmoid"), ("update", "sigmoid"), ("new", "tanh")),
    "rnn_tanh": (("hidden", "tanh"),),
    "rnn_relu": (("hidden", "relu"),),
}
#: Op names of the whole-sequence modules and of the cells.
MODULE_OPS = ("rnn", "lstm", "gru")
CELL_OPS = ("rnn_cell", "lstm_cell", "gru_cell")
#: Relative change of the per-unit forward statistics below which a step is stationary
#: (the Gaussian integrals are summed from float32 nodes: ~1e-7 is their resolution).
_CONVERGED = 1e-6


def family(module: Any) -> str | None:
    """``lstm``, ``gru``, ``rnn_tanh`` or ``rnn_relu`` for a recurrent module or cell."""
    import torch.nn as nn

    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    if isinstance(module, nn.RNN):
        return "rnn_relu" if getattr(module, "mode", "RNN_TANH") == "RNN_RELU" else "rnn_tanh"
    if isinstance(module, nn.RNNCell):
        return "rnn_relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "rnn_tanh"
    return None


# --------------------------------------------------------------------------- weights
@dataclass
class Weights:
    """One layer and direction: weights (float64) and their elementwise squares."""

    w_ih: torch.Tensor  # (G*H, n_in)
    w_hh: torch.Tensor  # (G*H, H)
    b_ih: torch.Tensor  # (G*H,)
    b_hh: torch.Tensor  # (G*H,)
    s_ih: torch.Tensor = field(init=False)
    s_hh: torch.Tensor = field(init=False)
    #: S^T, contiguous: what the backward pass multiplies by.
    s_ih_t: torch.Tensor = field(init=False)
    s_hh_t: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.s_ih = self.w_ih * self.w_ih
        self.s_hh = self.w_hh * self.w_hh
        self.s_ih_t = self.s_ih.t().contiguous()
        self.s_hh_t = self.s_hh.t().contiguous()

    @property
    def hidden(self) -> int:
        return self.w_hh.shape[1]


def layer_weights(module: Any, layer: int = 0, reverse: bool = False, cell: bool = False) -> Weights:
    """The weights of ``layer`` (and direction) of a recurrent module, or of a cell."""
    suffix = "" if cell else f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih = getattr(module, "weight_ih" + suffix).detach().double()
    w_hh = getattr(module, "weight_hh" + suffix).detach().double()
    rows = w_hh.shape[0]
    b_ih = getattr(module, "bias_ih" + suffix, None)
    b_hh = getattr(module, "bias_hh" + suffix, None)
    zero = torch.zeros(rows, dtype=torch.float64)
    return Weights(
        w_ih, w_hh,
        zero if b_ih is None else b_ih.detach().double().reshape(-1),
        zero if b_hh is None else b_hh.detach().double().reshape(-1),
    )


# --------------------------------------------------------------------------- expectations
def _sigmoid_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[s(a)], E[s(a)^2], E[s'(a)^2] per channel for a ~ N(mean, var), s = sigmoid."""
    x, w = channel_points(mean, var)
    s = torch.sigmoid(x)
    d = s * (1 - s)
    wf = w.float()
    return (wf @ s).double(), (wf @ (s * s)).double(), (wf @ (d * d)).double()


def _tanh_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[tanh(a)], E[tanh(a)^2], E[tanh'(a)^2] per channel for a ~ N(mean, var)."""
    x, w = channel_points(mean, var)
    t = torch.tanh(x)
    d = 1 - t * t
    wf = w.float()
    return (wf @ t).double(), (wf @ (t * t)).double(), (wf @ (d * d)).double()


def _relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed forms for a ~ N(mu, s^2), z = mu / s: E[relu(a)] = mu Phi(z) + s phi(z),
    E[relu(a)^2] = (mu^2 + s^2) Phi(z) + mu s phi(z), E[relu'(a)^2] = Phi(z)."""
    s = var.clamp_min(1e-300).sqrt()
    z = mean / s
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    m1 = mean * cdf + s * pdf
    m2 = (mean * mean + var) * cdf + mean * s * pdf
    return m1, m2.clamp_min(m1 * m1), cdf


_MOMENTS = {"sigmoid": _sigmoid_moments, "tanh": _tanh_moments, "relu": _relu_moments}


# --------------------------------------------------------------------------- one step
@dataclass
class Source:
    """How a unit's gradient at one of a step's outputs (``h_t`` or ``c_t``) reaches the
    step's inputs: per stacked gate row, the factor on the gradient of the pre-activation
    through the recurrent weights (``rec``) and the input weights (``inp``); per unit,
    the elementwise factor into h_{t-1} (``diag``, GRU's z) and into c_{t-1} (``cell``,
    LSTM's f). Second moments: E[(dL/da)^2] = rec * E[(dL/dh_t)^2] per row."""

    rec: torch.Tensor
    inp: torch.Tensor
    diag: torch.Tensor | None = None
    cell: torch.Tensor | None = None


@dataclass
class Step:
    """The statistics of one time step that the backward pass and the report read."""

    sources: dict[str, Source]  # "h" and (LSTM) "c"
    gates: dict[str, float]  # per-gate mean activation (and tanh' RMS) over units
    h_mean: torch.Tensor
    h_m2: torch.Tensor
    c_mean: torch.Tensor | None = None
    c_m2: torch.Tensor | None = None
    #: (mean, var) per unit of the Gaussians the step's gate values are drawn from
    #: (:func:`sample_back`): "a" the stacked pre-activations, and per family the
    #: previous cell "c_prev" (LSTM), or "u" = W_hn h + b_hn, "xn" = W_in x + b_in and
    #: "h_prev" (GRU).
    dist: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class State:
    """Per-unit forward statistics of the recurrent state entering a step."""

    h_mean: torch.Tensor
    h_m2: torch.Tensor
    c_mean: torch.Tensor | None = None
    c_m2: torch.Tensor | None = None

    @property
    def h_var(self) -> torch.Tensor:
        return (self.h_m2 - self.h_mean * self.h_mean).clamp_min(0.0)


def _preact(w: Weights, x_mean, x_var, st: State, rows: slice | None = None):
    w_ih, w_hh, s_ih, s_hh = w.w_ih, w.w_hh, w.s_ih, w.s_hh
    b = w.b_ih + w.b_hh
    if rows is not None:
        w_ih, w_hh, s_ih, s_hh, b = w_ih[rows], w_hh[rows], s_ih[rows], s_hh[rows], b[rows]
    mean = w_ih @ x_mean + w_hh @ st.h_mean + b
    var = s_ih @ x_var + s_hh @ st.h_var
    return mean, var


def step(fam: str, w: Weights, x_mean: torch.Tensor, x_var: torch.Tensor, st: State) -> Step:
    """One forward step (module docstring): the statistics of h_t (and c_t) and the
    backward factors of the step."""
    H = w.hidden
    if fam in ("rnn_tanh", "rnn_relu"):
        mean, var = _preact(w, x_mean, x_var, st)
        m1, m2, d2 = _MOMENTS["tanh" if fam == "rnn_tanh" else "relu"](mean, var)
        src = Source(rec=d2, inp=d2)
        gates = {"phi_prime_rms": float(d2.mean().sqrt())}
        return Step({"h": src}, gates, m1, m2, dist={"a": (mean, var)})
    if fam == "lstm":
        mean, var = _preact(w, x_mean, x_var, st)
        i1, i2, di = _sigmoid_moments(mean[:H], var[:H])
        f1, f2, df = _sigmoid_moments(mean[H : 2 * H], var[H : 2 * H])
        g1, g2, dg = _tanh_moments(mean[2 * H : 3 * H], var[2 * H : 3 * H])
        o1, o2, do = _sigmoid_moments(mean[3 * H :], var[3 * H :])
        c_mean = f1 * st.c_mean + i1 * g1
        c_m2 = (f2 * st.c_m2 + 2 * f1 * st.c_mean * i1 * g1 + i2 * g2).clamp_min(c_mean * c_mean)
        t1, t2, dt = _tanh_moments(c_mean, c_m2 - c_mean * c_mean)
        h_mean, h_m2 = o1 * t1, o2 * t2
        carry = o2 * dt  # h_t -> c_t: E[o^2] E[tanh'(c_t)^2]
        k_gates = torch.cat([g2 * di, st.c_m2 * df, i2 * dg])
        from_c = torch.cat([k_gates, torch.zeros(H, dtype=torch.float64)])
        from_h = torch.cat([k_gates * carry.repeat(3), t2 * do])
        sources = {
            "h": Source(rec=from_h, inp=from_h, cell=f2 * carry),
            "c": Source(rec=from_c, inp=from_c, cell=f2),
        }
        gates = {
            "input_mean": float(i1.mean()), "forget_mean": float(f1.mean()), "output_mean": float(o1.mean()),
            "cell_tanh_prime_rms": float(dg.mean().sqrt()), "forget_rms": float(f2.mean().sqrt()),
        }
        c_prev = (st.c_mean, (st.c_m2 - st.c_mean * st.c_mean).clamp_min(0.0))
        return Step(sources, gates, h_mean, h_m2, c_mean, c_m2, dist={"a": (mean, var), "c_prev": c_prev})
    if fam == "gru":
        rz_mean, rz_var = _preact(w, x_mean, x_var, st, slice(0, 2 * H))
        r1, r2, dr = _sigmoid_moments(rz_mean[:H], rz_var[:H])
        z1, z2, dz = _sigmoid_moments(rz_mean[H:], rz_var[H:])
        n_rows = slice(2 * H, 3 * H)
        u_mean = w.w_hh[n_rows] @ st.h_mean + w.b_hh[n_rows]
        u_m2 = u_mean * u_mean + w.s_hh[n_rows] @ st.h_var
        xn_mean = w.w_ih[n_rows] @ x_mean + w.b_ih[n_rows]
        xn_var = w.s_ih[n_rows] @ x_var
        n_mean = xn_mean + r1 * u_mean
        n_var = xn_var + (r2 * u_m2 - (r1 * u_mean) ** 2).clamp_min(0.0)
        n1, n2, dn = _tanh_moments(n_mean, n_var)
        keep2 = 1 - 2 * z1 + z2  # E[(1 - z)^2]
        h_mean = (1 - z1) * n1 + z1 * st.h_mean
        h_m2 = (keep2 * n2 + 2 * (z1 - z2) * n1 * st.h_mean + z2 * st.h_m2).clamp_min(h_mean * h_mean)
        d_n = keep2 * dn  # dL/d(n pre-activation)
        d_z = (st.h_m2 - 2 * st.h_mean * n1 + n2).clamp_min(0.0) * dz
        d_r = d_n * u_m2 * dr
        src = Source(rec=torch.cat([d_r, d_z, d_n * r2]), inp=torch.cat([d_r, d_z, d_n]), diag=z2)
        gates = {
            "update_mean": float(z1.mean()), "reset_mean": float(r1.mean()), "new_tanh_prime_rms": float(dn.mean().sqrt()),
        }
        dist = {"a": (rz_mean, rz_var), "u": (u_mean, (u_m2 - u_mean * u_mean).clamp_min(0.0)),
                "xn": (xn_mean, xn_var), "h_prev": (st.h_mean, st.h_var)}
        return Step({"h": src}, gates, h_mean, h_m2, dist=dist)
    raise Unhandled(f"unknown recurrent family {fam!r}")


def back(w: Weights, s: Step, grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step back in time: from the second moments of dL/dh_t (``grads["h"]``) and
    dL/dc_t arriving from step t+1 (``grads["c"]``), each (H, m) for m independent
    injections, those of dL/dh_{t-1} (from this step), dL/dx_t and dL/dc_{t-1}."""
    G = w.w_hh.shape[0] // w.hidden
    rows = None
    h_prev = None
    c_prev = None
    for name, g in grads.items():
        src = s.sources.get(name)
        if src is None or g is None:
            continue
        rep = g.repeat(G, 1)
        rec = src.rec.unsqueeze(1) * rep
        inp = src.inp.unsqueeze(1) * rep
        rows = (rec, inp) if rows is None else (rows[0] + rec, rows[1] + inp)
        if src.diag is not None:
            d = src.diag.unsqueeze(1) * g
            h_prev = d if h_prev is None else h_prev + d
        if src.cell is not None:
            d = src.cell.unsqueeze(1) * g
            c_prev = d if c_prev is None else c_prev + d
    rec_rows, inp_rows = rows
    h_rec = w.s_hh_t @ rec_rows
    h_prev = h_rec if h_prev is None else h_prev + h_rec
    return h_prev, w.s_ih_t @ inp_rows, c_prev


def step_gains(w: Weights, s: Step) -> dict[tuple[str, str], Any]:
    """Channel-aware engine gains of one step (a cell call): for each (output, input)
    pair of ``h``/``c`` outputs and ``x``/``h``/``c`` inputs, a
    :class:`~gradaudit.propagation.channels.Mat` or ``Diag`` mapping per-unit gradient
    second moments of the output to those of the input (the factors of :func:`back`)."""
    G = w.w_hh.shape[0] // w.hidden
    H = w.hidden
    out: dict[tuple[str, str], Any] = {}
    for name, src in s.sources.items():
        m_h = (w.s_hh * src.rec.unsqueeze(1)).reshape(G, H, H).sum(0)
        if src.diag is not None:
            m_h = m_h + torch.diag(src.diag)
        out[(name, "h")] = m_h
        out[(name, "x")] = (w.s_ih * src.inp.unsqueeze(1)).reshape(G, H, -1).sum(0)
        if src.cell is not None:
            out[(name, "c")] = src.cell
    return out


# --------------------------------------------------------------------------- over a sequence
@dataclass
class Direction:
    """The forward pass of one layer and direction over T steps."""

    weights: Weights
    steps: list[Step]  # one per time step, in processing order


def run_direction(fam: str, w: Weights, x_mean: torch.Tensor, x_var: torch.Tensor, init: State) -> Direction:
    """Forward over the T rows of ``x_mean`` / ``x_var`` (T, n_in), in that order. Once
    the input and the state stop changing (a stationary regime), the step is reused."""
    st = init
    steps: list[Step] = []
    last: Step | None = None
    stationary = False
    for t in range(x_mean.shape[0]):
        same_input = t > 0 and torch.equal(x_mean[t], x_mean[t - 1]) and torch.equal(x_var[t], x_var[t - 1])
        if stationary and same_input:
            steps.append(last)
            continue
        s = step(fam, w, x_mean[t], x_var[t], st)
        stationary = _close(s.h_mean, st.h_mean) and _close(s.h_m2, st.h_m2) and (
            s.c_m2 is None or (_close(s.c_mean, st.c_mean) and _close(s.c_m2, st.c_m2))
        )
        steps.append(s)
        last = s
        st = State(s.h_mean, s.h_m2, s.c_mean, s.c_m2)
    return Direction(w, steps)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.numel():
        return True
    return bool((a - b).abs().max() <= _CONVERGED * max(float(a.abs().max()), 1e-12))


def backward_direction(d: Direction, inject_h: torch.Tensor, inject_c_last: torch.Tensor | None,
                       inject_h_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backpropagation through time for one direction.

    ``inject_h`` (T, H, m): second moment of the gradient each step's h_t receives from
    outside the recurrence (its output), in processing order; ``inject_h_last`` /
    ``inject_c_last`` (H, m): what the final state (h_n, c_n) receives. Returns
    E[(dL/dx_t)^2] (T, n_in, m), E[(dL/dh_0)^2] (H, m) and E[(dL/dc_0)^2]."""
    T, H, m = inject_h.shape
    x_g = torch.zeros(T, d.weights.w_ih.shape[1], m, dtype=torch.float64)
    h_carry = inject_h_last.clone()
    c_carry = None if inject_c_last is None else inject_c_last.clone()
    for t in range(T - 1, -1, -1):
        h_carry, x_g[t], c_carry = back(d.weights, d.steps[t], {"h": inject_h[t] + h_carry, "c": c_carry})
    return x_g, h_carry, c_carry


def stationary_gain(w: Weights, s: Step, iters: int = 120) -> float:
    """The per-step RMS gain of dL/dh at the stationary forward state under the
    second-moment recursion of :func:`back`: the square root of the spectral radius of
    that (nonnegative) map, read as the growth rate of an iterate over its second half
    (Perron-Frobenius: the rate converges to the spectral radius)."""
    h = torch.ones(w.hidden, 1, dtype=torch.float64)
    c = torch.ones(w.hidden, 1, dtype=torch.float64) if "c" in s.sources else None
    log_norm = 0.0
    logs = []
    for _ in range(iters):
        h, _, c = back(w, s, {"h": h, "c": c})
        norm = float(h.sum() + (c.sum() if c is not None else 0.0))
        if not norm > 0:
            return 0.0
        h, c = h / norm, (c / norm if c is not None else None)
        log_norm += math.log(norm)
        logs.append(log_norm)
    half = iters // 2
    return math.exp((logs[-1] - logs[half - 1]) / (iters - half) / 2)


def block_sigmas(w_hh: torch.Tensor, fam: str) -> list[tuple[str, str, float]]:
    """``(gate, nonlinearity, largest singular value)`` of each gate block of a stacked
    recurrent weight (torch's row order)."""
    gates = GATES[fam]
    w = w_hh.detach().double()
    return [(gate, act, float(torch.linalg.matrix_norm(block, ord=2)))
            for block, (gate, act) in zip(w.chunk(len(gates), 0), gates)]


# --------------------------------------------------------------------------- module handler
def _time_axis(module: Any, ndim: int) -> int:
    if ndim == 2:  # unbatched (T, n_in)
        return 0
    return 1 if getattr(module, "batch_first", False) else 0


def _state_refs(hx: Any, engine) -> list[tuple[str, int] | None]:
    """(node, leaf) of h0 and (LSTM) c0 from the call's ``hx`` argument."""
    if hx is None:
        return [None, None]
    if isinstance(hx, Ref):
        node = engine.graph[hx.name]
        if node.tuple_output:
            leaves = list(_flat(node.structure))
            return [(hx.name, leaves[0]), (hx.name, leaves[1]) if len(leaves) > 1 else None]
        return [(hx.name, 0), None]
    if isinstance(hx, (tuple, list)):
        out: list[tuple[str, int] | None] = []
        for part in list(hx)[:2]:
            out.append((part.name, 0) if isinstance(part, Ref) else None)
            if part is not None and not isinstance(part, Ref):
                raise Unhandled("a constant initial state")
        return out + [None] * (2 - len(out))
    raise Unhandled("an initial state of an unexpected form")


def _flat(structure):
    if isinstance(structure, int):
        yield structure
    else:
        for s in structure:
            yield from _flat(s)


def _state_init(engine, ref: tuple[str, int] | None, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ref is None:
        z = torch.zeros(H, dtype=torch.float64)
        return z, z.clone()
    s = engine.leaf_stats(*ref)
    if s is None:
        raise Unhandled(f"initial state '{ref[0]}' has no statistics")
    return torch.full((H,), s.mean, dtype=torch.float64), torch.full((H,), s.m2, dtype=torch.float64)


@dataclass
class Stack:
    """The forward pass of a whole module: directions[layer][direction]."""

    fam: str
    layers: list[list[Direction]]
    T: int
    dropout: float


def run_stack(module: Any, fam: str, x: Stats, n_in: int, x_axis: int, T: int,
              h0: tuple[torch.Tensor, torch.Tensor], c0: tuple[torch.Tensor, torch.Tensor]) -> Stack:
    L = module.num_layers
    D = 2 if module.bidirectional else 1
    p = float(module.dropout) if L > 1 else 0.0
    mean_in, var_in = x.channels(x_axis, n_in)
    x_mean = mean_in.unsqueeze(0).expand(T, -1)
    x_var = var_in.unsqueeze(0).expand(T, -1)
    layers: list[list[Direction]] = []
    for layer in range(L):
        dirs = []
        for d in range(D):
            w = layer_weights(module, layer, reverse=d == 1)
            H = w.hidden
            init = State(h0[0][:H].clone(), h0[1][:H].clone(),
                         c0[0][:H].clone() if fam == "lstm" else None, c0[1][:H].clone() if fam == "lstm" else None)
            xm, xv = (x_mean, x_var) if d == 0 else (x_mean.flip(0), x_var.flip(0))
            dirs.append(run_direction(fam, w, xm.contiguous(), xv.contiguous(), init))
        layers.append(dirs)
        # the next layer reads this one's outputs, concatenated over directions (time order)
        means, m2s = [], []
        for d, dr in enumerate(dirs):
            hm = torch.stack([s.h_mean for s in dr.steps])
            h2 = torch.stack([s.h_m2 for s in dr.steps])
            if d == 1:
                hm, h2 = hm.flip(0), h2.flip(0)
            means.append(hm)
            m2s.append(h2)
        hm, h2 = torch.cat(means, 1), torch.cat(m2s, 1)
        if layer < L - 1 and p > 0:
            h2 = h2 / (1 - p)  # inverted dropout between layers (training mode)
        x_mean, x_var = hm, (h2 - hm * hm).clamp_min(0.0)
    return Stack(fam, layers, T, p)


def output_stats(stack: Stack) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, float]], list[tuple[float, float]]]:
    """Per-channel (time-averaged) mean and m2 of the output sequence; (mean, m2) of h_n
    and c_n per layer and direction (torch's order)."""
    top = stack.layers[-1]
    means = torch.cat([torch.stack([s.h_mean for s in d.steps]).mean(0) for d in top])
    m2s = torch.cat([torch.stack([s.h_m2 for s in d.steps]).mean(0) for d in top])
    hn, cn = [], []
    for dirs in stack.layers:
        for d in dirs:
            s = d.steps[-1]
            hn.append((float(s.h_mean.mean()), float(s.h_m2.mean())))
            if s.c_m2 is not None:
                cn.append((float(s.c_mean.mean()), float(s.c_m2.mean())))
    return means, m2s, hn, cn


def backward_stack(stack: Stack, out_h: torch.Tensor, last_h: torch.Tensor, last_c: torch.Tensor | None):
    """BPTT of second moments (:func:`back`) through every layer and direction, for m
    injections at once.

    ``out_h`` (m,): E[(dL/dy)^2] per element of the output sequence (every step, both
    directions of the top layer); ``last_h`` / ``last_c`` (m,): of dL/dh_n / dL/dc_n
    (every layer and direction). Returns E[(dL/dx)^2] (T, n_in, m) of the bottom layer's
    input in time order and the per-element averages of dL/dh0 and dL/dc0 (m,)."""
    T = stack.T
    m = out_h.numel()
    above: torch.Tensor | None = None  # (T, D*H, m) gradient on this layer's output from above
    h0_parts, c0_parts = [], []
    for layer in range(len(stack.layers) - 1, -1, -1):
        x_total = None
        for d, dr in enumerate(stack.layers[layer]):
            H = dr.weights.hidden
            if above is None:
                inj = out_h.reshape(1, 1, m).expand(T, H, m)
            else:
                inj = above[:, d * H : (d + 1) * H, :]
            if d == 1:
                inj = inj.flip(0)
            lc = None if last_c is None else last_c.reshape(1, m).expand(H, m)
            x_g, h0g, c0g = backward_direction(dr, inj, lc, last_h.reshape(1, m).expand(H, m))
            h0_parts.append(h0g.mean(0))
            if c0g is not None:
                c0_parts.append(c0g.mean(0))
            if d == 1:
                x_g = x_g.flip(0)
            x_total = x_g if x_total is None else x_total + x_g
        if layer > 0 and stack.dropout > 0:
            x_total = x_total / (1 - stack.dropout)
        above = x_total
    h0 = torch.stack(h0_parts).mean(0)
    c0 = torch.stack(c0_parts).mean(0) if c0_parts else None
    return above, h0, c0


def analyse_module(module: Any, x: Stats, x_shape: tuple[int, ...], h0=None, c0=None) -> tuple[Stack, dict]:
    """Forward statistics and backward gains of a whole ``nn.RNN`` / ``nn.LSTM`` /
    ``nn.GRU`` call (see the module docstring), plus its over-time prediction."""
    fam = family(module)
    if getattr(module, "proj_size", 0):
        raise Unhandled("LSTM with proj_size")
    t_axis = _time_axis(module, len(x_shape))
    T = x_shape[t_axis]
    n_in = x_shape[-1]
    H = module.hidden_size
    zeros = (torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64))
    stack = run_stack(module, fam, x, n_in, len(x_shape) - 1, T, h0 or zeros, c0 or zeros)
    lstm = fam == "lstm"
    eye = torch.eye(3, dtype=torch.float64)  # columns: output, h_n, c_n
    x_g, h0g, c0g = backward_stack(stack, eye[0], eye[1], eye[2] if lstm else None)
    info = {"x_gain": x_g.mean(dim=(0, 1)), "h0_gain": h0g, "c0_gain": c0g}  # per element of each input
    return stack, info


@handles(*MODULE_OPS)
def recurrent_module(ctx: Ctx) -> Effect:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` over the whole sequence, all layers and
    directions, by the step recursions of the module docstring (forward in time, BPTT
    backward). Gains (per element, linear in each output's gradient): the output sequence
    injects at every step of the top layer, h_n / c_n at the last step of every layer;
    inter-layer dropout is inverted dropout (training mode)."""
    node = ctx.node
    module = node.fn
    if family(module) is None:
        raise Unhandled("not a recurrent module")
    x_ref = ctx.arg(0, "input")
    if not isinstance(x_ref, Ref):
        raise Unhandled("the sequence is not a tensor")
    x_meta = ctx.meta(x_ref)
    if not x_meta.is_float or len(x_meta.shape) not in (2, 3):
        raise Unhandled("the sequence is not a float (T, n) or (T, B, n) tensor")
    x = ctx.stat(x_ref)
    H = module.hidden_size
    h_ref, c_ref = _state_refs(ctx.arg(1, "hx"), ctx.engine)
    h0 = _state_init(ctx.engine, h_ref, H) if h_ref is not None else None
    c0 = _state_init(ctx.engine, c_ref, H) if c_ref is not None else None
    stack, info = analyse_module(module, x, tuple(x_meta.shape), h0, c0)
    means, m2s, hn, cn = output_stats(stack)
    out_axis = len(ctx.out_meta.shape) - 1
    outs: list[Stats | None] = [Stats.per_channel(out_axis, means, m2s)]
    outs.append(make_stats(sum(a for a, _ in hn) / len(hn), sum(b for _, b in hn) / len(hn)))
    if cn:
        outs.append(make_stats(sum(a for a, _ in cn) / len(cn), sum(b for _, b in cn) / len(cn)))
    gains = []
    xg, h0g, c0g = info["x_gain"], info["h0_gain"], info["c0_gain"]
    n_out = len(outs)
    for leaf in range(n_out):
        gains.append((x_ref.name, 0, leaf, float(xg[leaf])))
        if h_ref is not None:
            gains.append((h_ref[0], h_ref[1], leaf, float(h0g[leaf])))
        if c_ref is not None and c0g is not None:
            gains.append((c_ref[0], c_ref[1], leaf, float(c0g[leaf])))
    return Effect(outs, gains, {"stack": stack})


# --------------------------------------------------------------------------- cells
def _cell_state(ctx: Ctx, ref: tuple[str, int] | None, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ref is None:
        z = torch.zeros(H, dtype=torch.float64)
        return z, z.clone()
    s = ctx.engine.leaf_stats(*ref)
    if s is None:
        raise Unhandled(f"state '{ref[0]}' has no statistics")
    mean, var = s.channels(len(ctx.engine.graph[ref[0]].outputs[ref[1]].shape) - 1, H)
    return mean, var + mean * mean


@handles(*CELL_OPS)
def recurrent_cell(ctx: Ctx) -> Effect:
    """One step of ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` (module docstring),
    per unit. Gains are channel matrices M[k, j] = sum over gate rows of S[row, j] times
    the row's backward factor, so a loop of calls propagates each unit's gradient as
    :func:`back` does; the step is kept for the over-time analysis of the loop."""
    node = ctx.node
    cell = node.fn
    fam = family(cell)
    if fam is None:
        raise Unhandled("not a recurrent cell")
    x_ref = ctx.arg(0, "input")
    if not isinstance(x_ref, Ref):
        raise Unhandled("the input is not a tensor")
    x_meta = ctx.meta(x_ref)
    w = layer_weights(cell, cell=True)
    H = w.hidden
    x_mean, x_var = ctx.stat(x_ref).channels(len(x_meta.shape) - 1, w.w_ih.shape[1])
    h_ref, c_ref = _state_refs(ctx.arg(1, "hx"), ctx.engine)
    h_mean, h_m2 = _cell_state(ctx, h_ref, H)
    c_mean, c_m2 = _cell_state(ctx, c_ref, H) if fam == "lstm" else (None, None)
    s = step(fam, w, x_mean, x_var, State(h_mean, h_m2, c_mean, c_m2))
    axis = len(ctx.out_meta.shape) - 1
    outs = [Stats.per_channel(axis, s.h_mean, s.h_m2)]
    if fam == "lstm":
        outs.append(Stats.per_channel(axis, s.c_mean, s.c_m2))
    maps = step_gains(w, s)
    x_axis = len(x_meta.shape) - 1
    gains = []
    for leaf, name in enumerate(("h", "c")[: len(outs)]):
        gains.append((x_ref.name, 0, leaf, channels.Mat(maps[(name, "x")], axis=x_axis)))
        if h_ref is not None:
            h_axis = len(ctx.engine.graph[h_ref[0]].outputs[h_ref[1]].shape) - 1
            gains.append((h_ref[0], h_ref[1], leaf, channels.Mat(maps[(name, "h")], axis=h_axis)))
        if c_ref is not None and (name, "c") in maps:
            gains.append((c_ref[0], c_ref[1], leaf, channels.Diag(maps[(name, "c")])))
    return Effect(outs, gains, {"step": s, "state_refs": (h_ref, c_ref)})
