"""GA103 activation-collapse: failing and passing models, checked against a real forward pass."""

import pytest
import torch.nn as nn
from rulemodels import audit, he, measure_layers, mlp, x_for

CODE = "GA103"

CASES = [
    pytest.param(lambda: mlp(30, 64, nn.ReLU, nn.init.xavier_normal_, bias=False), "collapse", id="relu-xavier-30"),
    pytest.param(lambda: mlp(12, 64, nn.Tanh, lambda w: nn.init.normal_(w, std=0.05), bias=False), "collapse", id="tanh-tiny-12"),
    pytest.param(lambda: mlp(30, 64, nn.ReLU, he, bias=False), None, id="relu-he-30"),
    pytest.param(lambda: mlp(30, 64, nn.ReLU, nn.init.xavier_normal_, norm=nn.LayerNorm), None, id="relu-xavier-layernorm"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding_and_real_activations(build, expect):
    """Reported at the first layer whose real output RMS is <= 1e-3 of the first layer's
    (+-1 layer); absent when the real RMS never gets there."""
    model = build()
    found = audit(model, x_for(model), CODE)
    real = [a for a, _ in measure_layers(model, x_for(model)).values()]
    hit = next((i for i, a in enumerate(real) if a <= 1e-3 * real[0]), None)
    if expect is None:
        assert found == [] and hit is None
        return
    (f,) = found
    assert f.severity == "warning" and hit is not None
    assert abs(f.data["layer_index"] - (hit + 1)) <= 1
    assert f.data["ratio"] <= 1e-3
