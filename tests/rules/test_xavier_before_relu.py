"""GA203 xavier-before-relu: He et al.'s 2^-29 over 30 layers, against a real forward pass."""

import math

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, he, mlp, x_for

CODE = "GA203"

CASES = [
    pytest.param(lambda: mlp(30, 256, nn.ReLU, nn.init.xavier_normal_, bias=False), ("0", "warning"), id="xavier-normal-30"),
    pytest.param(lambda: mlp(10, 64, nn.ReLU, nn.init.xavier_uniform_), ("0", "warning"), id="xavier-uniform-10"),
    pytest.param(lambda: mlp(9, 64, nn.ReLU, nn.init.xavier_uniform_), None, id="xavier-uniform-9"),
    pytest.param(lambda: mlp(30, 64, nn.ReLU, he), None, id="he-30"),
    pytest.param(lambda: mlp(30, 64, nn.ReLU, nn.init.xavier_normal_, norm=nn.LayerNorm), None, id="xavier-layernorm-30"),
    pytest.param(lambda: mlp(30, 64, nn.Tanh, nn.init.xavier_normal_), None, id="xavier-tanh-30"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_thirty_layers_halve_the_variance_29_times():
    """ORACLES.md (He et al. 2015): 30 Xavier-ReLU layers -> forward variance ratio 2^-29.
    The message states it. Per draw (width 256) the prediction follows a real forward
    pass of the same weights within 0.5 in log2; single draws scatter (Hanin 2018), so
    the average of three draws is compared with 2^-29 (+-1.5 in log2)."""
    preds, reals = [], []
    for seed in (0, 1, 2):
        model = mlp(30, 256, nn.ReLU, nn.init.xavier_normal_, bias=False, seed=seed)
        (f,) = audit(model, x_for(model), CODE)
        assert f.data["theory"] == 2.0**-29 and "2^-29" in f.message and "30 layers" in f.message
        torch.manual_seed(7)
        x = torch.randn(2048, 256)
        with torch.no_grad():
            y = model(x)
        preds.append(math.log2(f.data["variance_ratio"]))
        reals.append(math.log2(float(y.pow(2).mean() / x.pow(2).mean())))
        assert abs(preds[-1] - reals[-1]) <= 0.5
    assert abs(sum(reals) / 3 + 29) <= 1.5
    assert abs(sum(preds) / 3 + 29) <= 1.5
    assert f.fix == "nn.init.kaiming_normal_(model[0].weight, nonlinearity='relu')"
