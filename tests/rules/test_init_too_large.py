"""GA201 init-too-large: failing and passing models; numbers against closed forms."""

import math

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, he, measure_layers, mlp, normal, x_for

CODE = "GA201"

CASES = [
    # fan-in 100, sigma_w = 0.5: n Var[w] = 25 against He's 2 (the seed example)
    pytest.param(lambda: mlp(8, 100, nn.ReLU, normal(0.5)), ("0", "warning"), id="relu-sigma0.5"),
    pytest.param(lambda: mlp(12, 64, nn.Tanh, normal(1.0)), ("0", "warning"), id="tanh-normal-1"),
    pytest.param(lambda: mlp(8, 100, nn.ReLU, he), None, id="relu-he"),
    pytest.param(lambda: mlp(8, 100, nn.ReLU, normal(0.5), norm=nn.LayerNorm), None, id="relu-sigma0.5-layernorm"),
    # PyTorch's recommended tanh gain (5/3)^2 = 2.78 is > 2x LeCun but does not compound 10x in 12 layers
    pytest.param(lambda: mlp(12, 64, nn.Tanh, lambda w: nn.init.kaiming_normal_(w, nonlinearity="tanh")), None, id="tanh-gain-5/3"),
    pytest.param(lambda: mlp(2, 100, nn.ReLU, normal(0.5)), None, id="single-hidden-layer"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_numbers_match_closed_form_and_autograd():
    """n Var[w] = 100 * 0.25 = 25 vs He's 2 (12.5x); the real activation and gradient
    growth across the reported layers agrees with the message within a factor 2."""
    model = mlp(8, 100, nn.ReLU, normal(0.5))
    (f,) = audit(model, x_for(model), CODE)
    assert f.data["n_var_w"] == pytest.approx(25.0, rel=0.1)
    assert f.data["ratio"] == pytest.approx(12.5, rel=0.1)
    assert len(f.data["layers"]) == 7  # every hidden layer; the output layer has no activation to feed
    real = measure_layers(model, x_for(model))
    a0, g0 = real[f.data["layers"][0]]
    a1, g1 = real[f.data["layers"][-1]]
    real_decades = max(math.log10(a1 / a0), math.log10(g0 / g1))
    assert abs(f.data["decades"] - real_decades) <= math.log10(2)
    assert f.fix == "nn.init.kaiming_normal_(model[0].weight, nonlinearity='relu')"


def test_functional_leaky_relu_slope_sets_the_needed_gain():
    """F.leaky_relu(x, 0.3) needs n Var[w] = 2 / (1 + 0.3^2) (He et al. 2015), not the default slope's."""
    import torch.nn.functional as F

    from gradaudit.frontends.fx import trace
    from gradaudit.propagation.engine import propagate
    from gradaudit.rules.evidence.inits import leaky_slope, needed_gain

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.b(F.leaky_relu(self.a(x), 0.3))

    an = propagate(trace(Net(), (torch.randn(4, 8),)))
    act = next(n for n in an.graph if n.op == "leaky_relu")
    assert leaky_slope(act) == 0.3
    assert needed_gain("leaky_relu", act)[0] == pytest.approx(2 / 1.09)
