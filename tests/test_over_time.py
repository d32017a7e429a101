"""Recurrent layers over time: the predicted gradient-over-time curve against real BPTT.

For L = <y_T, g> (the output of the last step only), the curve is RMS(dL/dx_t) over the
batch and features, relative to the last step; the hidden-state curve is RMS(dL/dh_t),
the total gradient at h_t through the recurrence. A curve's per-step gain (geometric
mean of the ratio between successive steps, back to the horizon) and its horizon (steps
back until it falls below 1e-3, or rises above 1e3, of the last step's value) are read
the same way from the prediction and from a measurement with real autograd on fresh
random inputs (:func:`measure.measure_over_time`, :func:`measure.measure_hidden_over_time`,
which share nothing with gradaudit).

Tolerances: the per-step gain within 2x, the horizon within 25%.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measure_hidden_over_time, measure_over_time  # noqa: E402
from shown import shows  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.propagation.over_time import describe, tail_gain  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.oldest]

GAIN_FACTOR = 2.0
HORIZON_TOL = 0.25


class TanhRNN(nn.Module):
    """nn.RNN(tanh) with W_hh = radius x a random orthogonal matrix (all singular values
    equal to the radius); W_ih and the biases at PyTorch's default init."""

    def __init__(self, radius: float, inputs: int = 32, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(inputs, hidden)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(radius)

    def forward(self, x):
        return self.rnn(x)[0]


class LanguageModel(nn.Module):
    """Embedding -> LSTM -> linear head at PyTorch's default init (sequence first)."""

    def __init__(self, vocab: int = 1000, emb: int = 128, hidden: int = 256, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def _rnn_case(radius: float, steps: int, hidden: bool = False):
    model = TanhRNN(radius)
    x = torch.randn(steps, 32, 32)

    def make(g):
        return torch.randn(steps, 64, 32, generator=g)

    if hidden:
        return model, (x,), measure_hidden_over_time(model.rnn, make)
    return model, (x,), measure_over_time(lambda s: model.rnn(s)[0][-1], make)


def _lm_case(steps: int, hidden: bool = False):
    model = LanguageModel()
    ids = torch.randint(0, 1000, (steps, 32))

    def make(g):
        return model.emb(torch.randint(0, 1000, (steps, 64), generator=g))

    if hidden:
        return model, (ids,), measure_hidden_over_time(model.lstm, make)
    return model, (ids,), measure_over_time(lambda s: model.lstm(s)[0][-1], make)


def _compare(name: str, report, measured: list[float], hidden: bool = False) -> tuple:
    """The prediction and the measurement described alike, and a table of both curves
    (``hidden``: the dL/dh_t curves)."""
    (record,) = report.over_time
    pred = record.predicted_h if hidden else record.predicted
    meas = describe(measured, tail_gain(measured))
    lags = [k for k in (0, 1, 2, 5, 10, 20, 40) if k < len(measured) - 1] + [len(measured) - 1]
    rows = [f"{name}: {record.steps} steps, RMS of {'dL/dh_t' if hidden else 'dL/dx_t'}",
            "  steps back " + " ".join(f"{k:>9d}" for k in lags),
            "  predicted  " + " ".join(f"{pred.values[-1 - k]:9.3g}" if k < len(pred.values) else "        -" for k in lags),
            "  measured   " + " ".join(f"{measured[-1 - k]:9.3g}" for k in lags),
            f"  per-step gain: predicted {pred.gain:.4g}, measured {meas.gain:.4g} (ratio {pred.gain / meas.gain:.3f})",
            f"  horizon ({pred.direction}): predicted {pred.horizon:.4g}{' (extrapolated)' if pred.extrapolated else ''}, "
            f"measured {meas.horizon:.4g}{' (extrapolated)' if meas.extrapolated else ''} "
            f"(rel. err {pred.horizon / meas.horizon - 1:+.3f})"]
    print("\n".join(rows))
    return pred, meas, "\n".join(rows)


def _assert_agree(pred, meas, table: str) -> None:
    assert pred.direction == meas.direction, table
    assert 1 / GAIN_FACTOR <= pred.gain / meas.gain <= GAIN_FACTOR, table
    assert abs(pred.horizon / meas.horizon - 1) <= HORIZON_TOL, table


CURVES = [pytest.param(False, id="dx"), pytest.param(True, id="dh")]


@pytest.mark.parametrize("hidden", CURVES)
@pytest.mark.parametrize("radius, direction", [(0.5, "vanishing"), (1.6, "exploding")])
def test_tanh_rnn_orthogonal_80_steps(radius, direction, hidden):
    """Radius 0.5: the gradient falls about 0.46x per step (0.5 x the RMS of tanh'), below
    1e-3 after about 9 steps. Radius 1.6: tanh's saturation leaves about 1.07x per step,
    so it grows past 1e3 only after about 100 steps: beyond the 80-step sequence, so both
    horizons are extrapolated from their curves' own trend. Both at x_t and at h_t."""
    model, inputs, measured = _rnn_case(radius, 80, hidden)
    report = gradaudit.audit(model, inputs)
    pred, meas, table = _compare(f"tanh RNN, orthogonal radius {radius}", report, measured, hidden)
    assert pred.direction == direction, table
    _assert_agree(pred, meas, table)


@pytest.mark.parametrize("hidden", CURVES)
def test_tanh_rnn_radius_1_6_crosses_within_160_steps(hidden):
    """The radius-1.6 horizon seen, not extrapolated: over 160 steps both curves rise past
    1e3 inside the sequence."""
    model, inputs, measured = _rnn_case(1.6, 160, hidden)
    pred, meas, table = _compare("tanh RNN, orthogonal radius 1.6", gradaudit.audit(model, inputs), measured, hidden)
    assert not pred.extrapolated and not meas.extrapolated, table
    _assert_agree(pred, meas, table)


@pytest.mark.parametrize("hidden", CURVES)
def test_lstm_language_model_default_init(hidden):
    """Embedding -> LSTM -> head at PyTorch's default init: the forget gate is 0.5 on
    average and the gradient of the last step fades 1e3-fold about 13 steps back at x_t,
    about 10 at h_t (which drops about 7x at the first step back: the gradient injected
    at h_T reaches h_{T-1} only through the gates)."""
    model, inputs, measured = _lm_case(80, hidden)
    report = gradaudit.audit(model, inputs)
    pred, meas, table = _compare("LSTM language model, default init", report, measured, hidden)
    assert pred.direction == "vanishing", table
    _assert_agree(pred, meas, table)
    (record,) = report.over_time
    assert record.gates["forget_mean"] == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------- more layouts
class Stacked(nn.Module):
    """A 2-layer bidirectional LSTM, batch first: the cotangent at the last step of the
    top layer's forward direction reaches the input through both directions of the
    layer below."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.rnn = nn.LSTM(32, 64, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.rnn = nn.GRU(32, 128)

    def forward(self, x):
        return self.rnn(x)[0]


class CellLoop(nn.Module):
    """A cell called in a Python loop over time, as tutorials write it; the capture
    unrolls it into one call per step."""

    def __init__(self, kind, steps: int = 40) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cell = kind(32, 128)
        self.lstm = kind is nn.LSTMCell
        self.steps = steps

    def forward(self, x):
        h = x.new_zeros(x.shape[1], 128)
        state = (h, x.new_zeros(x.shape[1], 128)) if self.lstm else h
        for t in range(self.steps):
            state = self.cell(x[t], state)
        return state[0] if self.lstm else state


def _last_forward(model):
    if isinstance(model, Stacked):
        return lambda s: model.rnn(s)[0][:, -1, :64]
    if isinstance(model, CellLoop):
        return model
    return lambda s: model.rnn(s)[0][-1]


LAYOUTS = [
    pytest.param(Stacked, 1, id="lstm-2-layers-bidirectional-batch-first"),
    pytest.param(GRUNet, 0, id="gru"),
    pytest.param(lambda: CellLoop(nn.RNNCell), 0, id="rnn-cell-loop"),
    pytest.param(lambda: CellLoop(nn.LSTMCell), 0, id="lstm-cell-loop"),
    pytest.param(lambda: CellLoop(nn.GRUCell), 0, id="gru-cell-loop"),
]


@pytest.mark.parametrize("build, time_axis", LAYOUTS)
def test_other_layouts_against_real_bptt(build, time_axis):
    """Stacked and bidirectional modules, the GRU, and loops of cells (one curve per loop,
    one input per call): same tolerances as the acceptance cases."""
    model = build()
    steps = 40
    shape = (32, steps, 32) if time_axis == 1 else (steps, 32, 32)
    report = gradaudit.audit(model, (torch.randn(*shape),))
    big = (64,) + shape[1:] if time_axis == 1 else shape[:1] + (64,) + shape[2:]
    measured = measure_over_time(_last_forward(model), lambda g: torch.randn(*big, generator=g), time_axis=time_axis)
    pred, meas, table = _compare(type(model).__name__, report, measured)
    _assert_agree(pred, meas, table)
    if isinstance(model, CellLoop):
        (record,) = report.over_time
        assert len(record.nodes) == steps
        assert sum(1 for layer in report.layers if layer.depth is not None) == 1  # a loop is one weight layer


# --------------------------------------------------------------------------- probe and reports
def test_probe_measures_the_curve_and_every_report_shows_both():
    """With the probe, the report carries the measured curve beside the predicted one:
    it agrees with an independent measurement (same quantity, other inputs), the JSON
    report carries both curves, the text report prints both rows, the HTML report draws
    both series."""
    from gradaudit.report import html, text

    model = LanguageModel()
    ids = torch.randint(0, 1000, (60, 32))
    report = gradaudit.audit(model, (ids,), probe=True, draws=2)
    (record,) = report.over_time
    assert record.measured is not None and len(record.measured.values) == 60
    independent = describe(*(lambda c: (c, tail_gain(c)))(measure_over_time(
        lambda s: model.lstm(s)[0][-1], lambda g: model.emb(torch.randint(0, 1000, (60, 64), generator=g)))))
    assert record.measured.horizon == pytest.approx(independent.horizon, rel=0.15)
    assert record.predicted.horizon == pytest.approx(record.measured.horizon, rel=HORIZON_TOL)

    data = report.to_json()["over_time"][0]
    assert data["module"] == "lstm" and data["steps"] == 60 and data["family"] == "lstm"
    assert len(data["measured"]["values"]) == 60
    assert data["predicted"]["values"][-1] == 1.0 and data["measured"]["values"][-1] == 1.0
    assert data["predicted"]["horizon"] == pytest.approx(record.predicted.horizon, rel=1e-5)
    assert data["measured"]["per_step_gain"] == pytest.approx(record.measured.gain, rel=1e-5)
    assert data["predicted_h"]["horizon"] == pytest.approx(record.predicted_h.horizon, rel=1e-5)
    assert len(data["predicted_h"]["values"]) == len(record.predicted_h.values)
    assert math.isclose(data["gates"]["forget_mean"], record.gates["forget_mean"], rel_tol=1e-5)

    out = text.render(report)
    assert "over time" in out and "'lstm' (LSTM, 60 steps)" in out
    section = out[out.index("over time ("):]
    rows = [line.split() for line in section.splitlines() if line.strip().startswith(("predicted", "measured"))]
    assert [r[0] for r in rows] == ["predicted", "measured"] and rows[0][1] == rows[1][1] == "1"
    assert shows(section, "dL/dh_t: per-step gain {}, falls below 1e-3 after {} steps back predicted",
                 record.predicted_h.gain, record.predicted_h.horizon)

    page = html.render(report)
    assert '<section id="over-time">' in page
    assert 'class="series predicted"' in page and 'class="series measured"' in page
    assert page.count('class="horizon"') == 2  # both curves cross 1e-3 inside the sequence
    assert shows(page, "dL/dh_t: per-step gain {}, falls below 1e-3 after {} steps back predicted",
                 record.predicted_h.gain, record.predicted_h.horizon)


def test_static_report_without_recurrent_layers_has_no_over_time():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    report = gradaudit.audit(model, (torch.randn(4, 8),))
    assert report.over_time == [] and report.to_json()["over_time"] == []
    from gradaudit.report import html, text

    assert "over time" not in text.render(report) and 'id="over-time"' not in html.render(report)


class ShapeLoop(nn.Module):
    """An LSTM cell over ``range(x.shape[0])`` with ``torch.zeros`` states: torch.fx cannot
    trace it (a proxy in ``range``), torch.export unrolls it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cell = nn.LSTMCell(32, 128)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        h, c = torch.zeros(x.shape[1], 128), torch.zeros(x.shape[1], 128)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return self.head(h)


class Branching(nn.Module):
    """An LSTM behind data-dependent control flow: only the hook capture takes it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lstm = nn.LSTM(32, 128)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.head(self.lstm(x)[0])


@pytest.mark.parametrize("build", [ShapeLoop, Branching])
def test_other_captures_predict_and_measure_over_time(build):
    """Whichever capture takes the model, the recurrent layer (or loop) gets its predicted
    curve and, with the probe, its measured one (module calls matched by call order)."""
    report = gradaudit.audit(build(), (torch.randn(40, 32, 32),), probe=True, draws=2)
    assert report.frontend != "fx"
    (record,) = report.over_time
    assert record.measured is not None and len(record.measured.values) == 40
    assert (len(record.nodes) == 40) == (build is ShapeLoop)
    pred, meas = record.predicted, record.measured
    assert pred.direction == meas.direction == "vanishing"
    assert abs(pred.horizon / meas.horizon - 1) <= HORIZON_TOL, (pred, meas)
    assert 1 / GAIN_FACTOR <= pred.gain / meas.gain <= GAIN_FACTOR
