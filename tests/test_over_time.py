"""Recurrent layers over time: the predicted gradient-over-time curve against real BPTT.

For L = <y_T, g> (the output of the last step only), the curve is RMS(dL/dx_t) over the
batch and features, relative to the last step. Its per-step gain (geometric mean of the
ratio between successive steps, back to the horizon) and its horizon (steps back until
it falls below 1e-3, or rises above 1e3, of the last step's value) are read the same way
from the prediction and from a measurement with real autograd on fresh random inputs
(:func:`measure.measure_over_time`, which shares nothing with gradaudit).

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

from measure import measure_over_time  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.propagation.recurrent import describe, tail_gain  # noqa: E402

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


def _rnn_case(radius: float, steps: int):
    model = TanhRNN(radius)
    x = torch.randn(steps, 32, 32)
    measured = measure_over_time(lambda s: model.rnn(s)[0][-1], lambda g: torch.randn(steps, 64, 32, generator=g))
    return model, (x,), measured


def _lm_case(steps: int):
    model = LanguageModel()
    ids = torch.randint(0, 1000, (steps, 32))

    def make(g):
        return model.emb(torch.randint(0, 1000, (steps, 64), generator=g))

    measured = measure_over_time(lambda s: model.lstm(s)[0][-1], make)
    return model, (ids,), measured


def _compare(name: str, report, measured: list[float]) -> tuple:
    (record,) = report.over_time
    pred = record.predicted
    meas = describe(measured, tail_gain(measured))
    lags = [0, 1, 2, 5, 10, 20, 40, len(measured) - 1]
    rows = [f"{name}: {record.steps} steps",
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


@pytest.mark.parametrize("radius, direction", [(0.5, "vanishing"), (1.6, "exploding")])
def test_tanh_rnn_orthogonal_80_steps(radius, direction):
    """Radius 0.5: the gradient falls about 0.46x per step (0.5 x the RMS of tanh'), below
    1e-3 after about 9 steps. Radius 1.6: tanh's saturation leaves about 1.07x per step,
    so it grows past 1e3 only after about 100 steps: beyond the 80-step sequence, so both
    horizons are extrapolated from their curves' own trend."""
    model, inputs, measured = _rnn_case(radius, 80)
    report = gradaudit.audit(model, inputs)
    pred, meas, table = _compare(f"tanh RNN, orthogonal radius {radius}", report, measured)
    assert pred.direction == direction, table
    _assert_agree(pred, meas, table)


def test_tanh_rnn_radius_1_6_crosses_within_160_steps():
    """The radius-1.6 horizon seen, not extrapolated: over 160 steps both curves rise past
    1e3 inside the sequence."""
    model, inputs, measured = _rnn_case(1.6, 160)
    pred, meas, table = _compare("tanh RNN, orthogonal radius 1.6", gradaudit.audit(model, inputs), measured)
    assert not pred.extrapolated and not meas.extrapolated, table
    _assert_agree(pred, meas, table)


def test_lstm_language_model_default_init():
    """Embedding -> LSTM -> head at PyTorch's default init: the forget gate is 0.5 on
    average and the gradient of the last step fades 1e3-fold about 13 steps back."""
    model, inputs, measured = _lm_case(80)
    report = gradaudit.audit(model, inputs)
    pred, meas, table = _compare("LSTM language model, default init", report, measured)
    assert pred.direction == "vanishing", table
    _assert_agree(pred, meas, table)
    (record,) = report.over_time
    assert record.gates["forget_mean"] == pytest.approx(0.5, abs=0.02)
