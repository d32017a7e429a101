"""GA502 recurrent-vanishing: every block well below 1/gamma, checked with real BPTT."""

import pytest
import torch
import torch.nn as nn
from rulemodels import Cell, Recurrent, audit, seq_input
from test_recurrent_exploding import normal_hh, orthogonal_hh
from shown import shows

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
