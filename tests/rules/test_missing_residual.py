"""GA303 missing-residual."""

import pytest
import torch.nn as nn
from rulemodels import ResMLP, audit, he, mlp, x_for

CODE = "GA303"

CASES = [
    pytest.param(lambda: mlp(20, 32, nn.ReLU, he), ("0", "warning"), id="plain-20"),
    pytest.param(lambda: mlp(24, 32, nn.ReLU, he, norm=nn.LayerNorm), ("0", "info"), id="plain-layernorm-24"),
    pytest.param(lambda: mlp(19, 32, nn.ReLU, he), None, id="plain-19"),
    pytest.param(lambda: ResMLP(24), None, id="residual-24"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_counts_layers_and_fix_is_code():
    model = mlp(20, 32, nn.ReLU, he)
    (f,) = audit(model, x_for(model), CODE)
    assert f.data["layers"] == 20 and f.data["normalized"] is False
    assert f.fix.startswith("x = x + model[0](x)")
    compile(f.fix, "<fix>", "exec")
