"""GA501 recurrent-exploding: largest singular value vs 1/gamma (Pascanu et al. 2013)."""

import pytest
import torch
import torch.nn as nn
from rulemodels import Cell, Recurrent, audit, seq_input
from shown import shows

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.oldest]

CODE = "GA501"


def normal_hh(std):
    def init(m):
        for n, p in m.named_parameters():
            if n.startswith("weight_hh"):
                nn.init.normal_(p, std=std)

    return init


def orthogonal_hh(m):
    for n, p in m.named_parameters():
        if n.startswith("weight_hh"):
            nn.init.orthogonal_(p)


CASES = [
    pytest.param(lambda: Recurrent(nn.RNN, normal_hh(0.3)), ("rnn", "warning"), id="rnn-std0.3"),
    pytest.param(lambda: Recurrent(nn.RNN, normal_hh(0.3), nonlinearity="relu"), ("rnn", "warning"), id="relu-rnn-std0.3"),
    pytest.param(lambda: Cell(nn.RNNCell, normal_hh(0.3)), ("cell", "warning"), id="rnncell-std0.3"),
    pytest.param(lambda: Recurrent(nn.LSTM, normal_hh(0.9)), ("rnn", "info"), id="lstm-std0.9"),
    pytest.param(lambda: Recurrent(nn.GRU, normal_hh(0.3)), ("rnn", "info"), id="gru-std0.3"),
    pytest.param(lambda: Recurrent(nn.RNN, orthogonal_hh), None, id="rnn-orthogonal"),
    pytest.param(lambda: Recurrent(nn.RNN, normal_hh(0.01)), None, id="rnn-std0.01"),
    pytest.param(lambda: Recurrent(nn.LSTM, orthogonal_hh), None, id="lstm-orthogonal"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    found = audit(build(), seq_input(), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


@pytest.mark.parametrize("build", [c.values[0] for c in CASES if c.values[1] is not None])
def test_singular_values_and_thresholds(build):
    """The quoted singular values are those of torch.linalg.svdvals, per gate block;
    thresholds 1 for tanh/ReLU blocks and 4 for sigmoid gates."""
    model = build()
    (f,) = audit(model, seq_input(), CODE)
    mod = model.get_submodule(f.module)
    gates = {nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 3, nn.GRUCell: 3}.get(type(mod), 1)
    sig = {nn.LSTM: {0, 1, 3}, nn.GRU: {0, 1}}.get(type(mod), set())
    for param, gate, sigma, threshold in f.data["blocks"]:
        w = getattr(mod, param).detach().double()
        index = ["input", "forget", "cell", "output"].index(gate) if gates == 4 else (
            ["reset", "update", "new"].index(gate) if gates == 3 else 0
        )
        block = w.chunk(gates, 0)[index]
        assert sigma == pytest.approx(float(torch.linalg.svdvals(block)[0]), rel=1e-9)
        assert threshold == (4.0 if index in sig else 1.0)
        assert sigma > threshold
        assert shows(f.message, "{} > 1/gamma = {}", sigma, threshold)


# ----------------------------------------------------------------------------- over time
def _orthogonal_rnn(radius, hidden=128):
    torch.manual_seed(0)

    def init(m):
        nn.init.orthogonal_(m.weight_hh_l0)
        with torch.no_grad():
            m.weight_hh_l0.mul_(radius)

    return Recurrent(nn.RNN, init, hidden=hidden)


def _measured_horizon(model, steps):
    """The horizon of the real BPTT curve (a loss on the last step only)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from measure import measure_over_time

    from gradaudit.propagation.over_time import describe, tail_gain

    curve = measure_over_time(lambda s: model.rnn(s)[0][-1], lambda g: torch.randn(steps, 64, 16, generator=g))
    return describe(curve, tail_gain(curve))


def test_error_when_the_gradient_grows_past_1e3_within_the_sequence():
    """Orthogonal W_hh of radius 3 over 40 steps: tanh's saturation leaves ~1.36x per
    step, past 1e3 within the sequence: an error, and real BPTT agrees."""
    model = _orthogonal_rnn(3.0)
    (f,) = audit(model, seq_input(steps=40), CODE)
    assert f.severity == "error"
    real = _measured_horizon(model, 40)
    assert real.direction == "exploding" and not real.extrapolated
    assert f.data["horizon"] == pytest.approx(real.horizon, rel=0.25)
    assert "rises above 1e3 of its value after" in f.message and "of the 40 steps" in f.message


def test_no_finding_when_the_gradient_fades_within_the_sequence():
    """An LSTM at PyTorch's default init has a cell-gate block above 1/gamma = 1, but over
    40 steps the gradient of the last step fades 1e3-fold (GA502's finding, not this
    one's); real BPTT agrees that it fades within the sequence."""
    model = Recurrent(nn.LSTM, hidden=128)
    blocks = [float(torch.linalg.svdvals(b)[0]) for b in model.rnn.weight_hh_l0.detach().chunk(4, 0)]
    assert blocks[2] > 1.0  # the cell gate (tanh): above Pascanu's threshold
    assert audit(model, seq_input(steps=40), CODE) == []
    real = _measured_horizon(model, 40)
    assert real.direction == "vanishing" and not real.extrapolated
