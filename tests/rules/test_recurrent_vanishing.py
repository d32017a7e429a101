"""GA502 recurrent-vanishing: every block well below 1/gamma, checked with real BPTT."""

import pytest
import torch
import torch.nn as nn
from rulemodels import Cell, Recurrent, audit, seq_input
from test_recurrent_exploding import normal_hh, orthogonal_hh
from shown import shows

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.oldest]

CODE = "GA502"

CASES = [
    pytest.param(lambda: Recurrent(nn.RNN, normal_hh(0.01)), ("rnn", "warning"), id="rnn-std0.01"),
    pytest.param(lambda: Cell(nn.RNNCell, normal_hh(0.01)), ("cell", "warning"), id="rnncell-std0.01"),
    pytest.param(lambda: Recurrent(nn.LSTM, normal_hh(0.01)), ("rnn", "info"), id="lstm-std0.01"),
    pytest.param(lambda: Recurrent(nn.RNN, orthogonal_hh), None, id="rnn-orthogonal"),
    pytest.param(lambda: Recurrent(nn.RNN), None, id="rnn-default"),
    pytest.param(lambda: Recurrent(nn.GRU), None, id="gru-default"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    found = audit(build(), seq_input(), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_real_bptt_gradient_shrinks_at_least_as_stated():
    """Pascanu et al.: ||dh_T/dh_0|| <= (sigma_max gamma)^T. Real autograd (float64, on
    the flagged RNN after the audit) through 20 steps stays under the bound the message
    quotes."""
    model = Recurrent(nn.RNN, normal_hh(0.01))
    (f,) = audit(model, seq_input(), CODE)
    per_step = f.data["sigma_max"] / f.data["threshold"]
    rnn = model.rnn.double()
    torch.manual_seed(6)
    h0 = torch.randn(1, 1, 32, dtype=torch.float64, requires_grad=True)
    out, _ = rnn(torch.randn(20, 1, 16, dtype=torch.float64), h0)
    (g,) = torch.autograd.grad(out[-1].sum(), h0)
    jac_bound = per_step**20 * (32**0.5)  # ||J^T 1|| <= ||J|| ||1||
    assert 0 < float(g.norm()) <= jac_bound
    assert shows(f.message, "{}x per step", per_step)


# ----------------------------------------------------------------------------- over time
from test_recurrent_exploding import _measured_horizon  # noqa: E402

import gradaudit  # noqa: E402

OVER_TIME = [
    pytest.param(lambda: Recurrent(nn.RNN, hidden=128), ("rnn", "warning"), True, id="rnn-default-40-steps"),
    pytest.param(lambda: Recurrent(nn.LSTM, hidden=128), ("rnn", "info"), True, id="lstm-default-40-steps"),
    pytest.param(lambda: Recurrent(nn.GRU, hidden=128), ("rnn", "info"), True, id="gru-default-40-steps"),
    pytest.param(lambda: Recurrent(nn.RNN, orthogonal_hh, hidden=128), None, False, id="rnn-orthogonal-40-steps"),
]


@pytest.mark.parametrize("build, expect, fades", OVER_TIME)
def test_gradient_over_time_fades_within_the_sequence(build, expect, fades):
    """Over 40 steps the gradient of a loss on the last step falls below 1e-3 within the
    sequence at PyTorch's default init (RNN, LSTM, GRU), and not with orthogonal W_hh;
    real BPTT agrees, and the quoted horizon is within 25% of the real one."""
    model = build()
    found = audit(model, seq_input(steps=40), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])
    real = _measured_horizon(model, 40)
    assert (real.direction == "vanishing" and not real.extrapolated) == fades
    if found:
        assert found[0].data["horizon"] == pytest.approx(real.horizon, rel=0.25)


def test_the_gate_bias_fix_lengthens_the_real_horizon():
    """GA502's fix for an LSTM (forget-gate bias 1, Jozefowicz et al. 2015), applied as
    written, lengthens the horizon of real BPTT by more than half."""
    model = Recurrent(nn.LSTM, hidden=128)
    report = gradaudit.audit(model, seq_input(steps=40), select=[CODE])
    (f,) = report.findings
    forget = report.over_time[0].gates["forget_mean"]
    assert "forget-gate bias" in f.fix and shows(f.message, "the forget gate is {} on average", forget)
    assert forget == pytest.approx(0.5, abs=0.02)
    before = _measured_horizon(model, 40).horizon
    exec(f.fix, {"nn": nn, "model": model})
    after = _measured_horizon(model, 40).horizon
    assert after > 1.5 * before, (before, after)
