"""GA202 init-too-small: failing and passing models; numbers against closed forms."""

import math

import pytest
import torch.nn as nn
from rulemodels import normal, audit, he, lecun, measure_layers, mlp, x_for

CODE = "GA202"

CASES = [
    # PyTorch's default init: n Var[w] = 1/3 against He's 2 (6x) and LeCun's 1 (3x)
    pytest.param(lambda: mlp(12, 64, nn.ReLU), ("0", "warning"), id="relu-default"),
    pytest.param(lambda: mlp(12, 64, nn.Tanh), ("0", "warning"), id="tanh-default"),
    pytest.param(lambda: mlp(12, 64, nn.ReLU, he), None, id="relu-he"),
    pytest.param(lambda: mlp(12, 64, nn.Tanh, lecun), None, id="tanh-lecun"),
    pytest.param(lambda: mlp(12, 64, nn.ReLU, norm=nn.BatchNorm1d), None, id="relu-default-batchnorm"),
    # Xavier before ReLU is exactly 2x below He: GA203's pattern, not this rule's
    pytest.param(lambda: mlp(30, 64, nn.ReLU, nn.init.xavier_normal_), None, id="relu-xavier"),
    pytest.param(lambda: mlp(2, 64, nn.ReLU), None, id="single-hidden-layer"),
    pytest.param(lambda: mlp(5, 64, nn.ReLU), ("0", "warning"), id="four-hidden-layers"),
    # two layers (a residual branch's MLP with a small init) scale the branch, no depth effect
    pytest.param(lambda: mlp(2, 64, nn.ReLU, normal(0.02)), None, id="two-layers-small-init"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


@pytest.mark.parametrize("act, needed", [(nn.ReLU, 2.0), (nn.Tanh, 1.0)])
def test_default_init_gain_is_one_third(act, needed):
    """Var[U(+-1/sqrt(n))] = 1/(3n): n Var[w] = 1/3, so the shortfall is 3 * needed; the
    real gradient decay across the reported layers matches the message within 2x."""
    model = mlp(12, 64, act)
    (f,) = audit(model, x_for(model), CODE)
    assert f.data["n_var_w"] == pytest.approx(1 / 3, rel=0.1)
    assert f.data["needed"] == needed
    assert f.data["ratio"] == pytest.approx(1 / (3 * needed), rel=0.1)
    real = measure_layers(model, x_for(model))
    (a0, g0), (a1, g1) = real[f.data["layers"][0]], real[f.data["layers"][-1]]
    assert abs(f.data["decades"] - max(math.log10(a0 / a1), math.log10(g1 / g0))) <= math.log10(2)
