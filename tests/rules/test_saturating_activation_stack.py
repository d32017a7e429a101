"""GA301 saturating-activation-stack, and the sigmoid's useful-input band (ORACLES.md)."""

import math

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, he, mlp, x_for
from shown import shows

from gradaudit.rules.saturating_activation_stack import sigmoid_prime, tanh_prime, useful_band, widest_band

CODE = "GA301"

CASES = [
    pytest.param(lambda: mlp(4, 32, nn.Sigmoid, nn.init.xavier_normal_), ("0", "warning"), id="3-sigmoids"),
    pytest.param(lambda: mlp(5, 32, nn.Tanh, nn.init.xavier_normal_), ("0", "warning"), id="4-tanh"),
    pytest.param(lambda: mlp(5, 32, nn.Hardtanh, nn.init.xavier_normal_), ("0", "warning"), id="4-hardtanh"),
    pytest.param(lambda: mlp(3, 32, nn.Sigmoid, nn.init.xavier_normal_), None, id="2-sigmoids"),
    pytest.param(lambda: mlp(4, 32, nn.Sigmoid, nn.init.xavier_normal_, norm=nn.LayerNorm), None, id="sigmoids-layernorm"),
    pytest.param(lambda: mlp(6, 32, nn.ReLU, he), None, id="relu"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_widest_sigmoid_band_is_045_at_w_69():
    """ORACLES.md: |sigma'(wx + b) w| > 1 needs |w| > 4 and then holds on a band of x at
    most about 0.45 wide, reached at |w| ~ 6.9."""
    width, w = widest_band(sigmoid_prime)
    assert width == pytest.approx(0.45, abs=0.005)
    assert w == pytest.approx(6.9, abs=0.1)


@pytest.mark.parametrize("w", [4.5, 6.9, 12.0, 40.0])
def test_band_matches_brute_force(w):
    """The closed-form band equals the measure of {x : |sigma'(w x + b) w| > 1} on a grid,
    for the best bias (b only shifts the band: b = 0)."""
    x = torch.linspace(-3, 3, 600001, dtype=torch.float64)
    s = torch.sigmoid(w * x)
    measure = float(((s * (1 - s) * w) > 1).sum()) * float(x[1] - x[0])
    assert useful_band(w) == pytest.approx(measure, abs=1e-4)


@pytest.mark.parametrize("w", [0.5, 1.0, 3.9, 4.0])
def test_no_band_at_or_below_four(w):
    assert useful_band(w) == 0.0


@pytest.mark.parametrize("w", [1.5, 2.0, 5.0])
def test_tanh_band_is_twice_the_sigmoid_band_at_4w(w):
    """tanh'(x) = 4 sigma'(2x), hence band_tanh(w) = 2 band_sigmoid(4w)."""
    assert useful_band(w, tanh_prime) == pytest.approx(2 * useful_band(4 * w), rel=1e-9)


def test_message_carries_the_numbers_and_a_real_gradient_factor():
    model = mlp(4, 32, nn.Sigmoid, nn.init.xavier_normal_)
    (f,) = audit(model, x_for(model), CODE)
    width, w = widest_band(sigmoid_prime)
    assert "<= 1/4" in f.message and "|w| > 4" in f.message
    assert shows(f.message, "at most {} wide (at |w| ~ {})", width, w)
    assert f.fix.startswith("model[1] = nn.ReLU()")
    # real per-layer gradient factor along the three sigmoid layers (autograd)
    m = model
    torch.manual_seed(2)
    x = torch.randn(512, 32)
    outs = {}
    hooks = [m[i].register_forward_hook(lambda _m, _i, o, i=i: (o.retain_grad(), outs.__setitem__(i, o))[0]) for i in (0, 4)]
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    for h in hooks:
        h.remove()
    real = math.sqrt(outs[0].grad.pow(2).mean() / outs[4].grad.pow(2).mean()) ** 0.5
    assert f.data["per_layer_gradient_factor"] == pytest.approx(real, rel=0.25)
