"""GA204 symmetric-init: constant/zero hidden layers, against real forward/backward passes."""

import pytest
import torch
import torch.nn as nn
from rulemodels import FixupBlock, all_constant, audit, constant_hidden, mlp, zero_classifier

CODE = "GA204"

CASES = [
    pytest.param(lambda: all_constant(3), [("0", "error"), ("2", "error")], id="all-constant-zero-bias"),
    pytest.param(lambda: constant_hidden(0.01), [("0", "warning")], id="constant-hidden-random-next"),
    pytest.param(lambda: mlp(3, 32, nn.ReLU, nn.init.zeros_), [("0", "warning"), ("2", "warning")], id="zero-weights-random-bias"),
    pytest.param(lambda: mlp(3, 32, nn.ReLU), [], id="default-init"),
    pytest.param(lambda: FixupBlock(), [], id="zero-last-layer-of-residual-branch"),
    pytest.param(lambda: zero_classifier(), [], id="zero-classifier"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, torch.randn(4, 32), CODE)
    assert [(f.module, f.severity) for f in found] == expect


def _real_weight_grad(model, layer):
    torch.manual_seed(3)
    out = model(torch.randn(16, 32))
    (out * torch.randn_like(out)).sum().backward()
    grad = layer.weight.grad.clone()
    model.zero_grad()
    return grad


def test_error_means_identical_real_gradients():
    """error: the real weight gradient has equal rows, so the units stay copies."""
    model = all_constant(3)
    for f in audit(model, torch.randn(4, 32), CODE):
        grad = _real_weight_grad(model, model.get_submodule(f.module))
        assert grad.abs().sum() > 0 and torch.allclose(grad, grad[:1].expand_as(grad))


def test_warning_means_rank_one_output():
    """warning: the units differ only downstream; the real gradient rows differ, and the
    layer's output minus its bias has rank 1."""
    model = constant_hidden(0.01)
    (f,) = audit(model, torch.randn(4, 32), CODE)
    layer = model.get_submodule(f.module)
    grad = _real_weight_grad(model, layer)
    assert not torch.allclose(grad, grad[:1].expand_as(grad))
    with torch.no_grad():
        h = layer(torch.randn(64, 32)) - layer.bias
    assert torch.linalg.matrix_rank(h).item() == 1
    assert "all 0.01" in f.message and "rank 1" in f.message
