"""GA102 exploding-gradients: failing and passing models, checked against real autograd."""

import pytest
import torch.nn as nn
from rulemodels import audit, check_gradient_crossing, he, measure_layers, mlp, normal, scaled, x_for
from shown import shows

CODE = "GA102"

CASES = [
    pytest.param(lambda: mlp(24, 64, nn.ReLU, scaled(4.0)), ("0", "error"), id="relu-twice-he-24"),
    pytest.param(lambda: mlp(16, 64, nn.Tanh, normal(1.0)), ("8", "error"), id="tanh-normal-1"),
    pytest.param(lambda: mlp(16, 64, nn.ReLU, scaled(4.0)), ("0", "warning"), id="relu-twice-he-16"),
    pytest.param(lambda: mlp(12, 64, nn.ReLU, scaled(4.0)), None, id="relu-twice-he-12"),
    pytest.param(lambda: mlp(24, 64, nn.ReLU, he), None, id="relu-he-24"),
    pytest.param(lambda: mlp(16, 64, nn.Tanh, normal(1.0), norm=nn.LayerNorm), None, id="tanh-normal-1-layernorm"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding_and_real_gradients(build, expect):
    """The finding appears exactly when real autograd shows the first layer's gradient at
    >= 1e3 times the last one's (error), or short of that at >= 1e2 (warning)."""
    check_gradient_crossing(build(), CODE, expect, +1)


def test_message_carries_ratio_and_rate():
    model = mlp(24, 64, nn.ReLU, scaled(4.0))
    (f,) = audit(model, x_for(model), CODE)
    real = [g for _, g in measure_layers(model, x_for(model)).values()]
    assert f.data["ratio"] == pytest.approx(real[0] / real[-1], rel=0.5)
    assert shows(f.message, "grows {}x", f.data["ratio"]) and "10x every" in f.message
    assert f.fix == "nn.init.kaiming_normal_(model[0].weight, nonlinearity='relu')"
