"""GA501 recurrent-exploding: largest singular value vs 1/gamma (Pascanu et al. 2013)."""

import pytest
import torch
import torch.nn as nn
from rulemodels import Cell, Recurrent, audit, seq_input
from shown import shows

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
