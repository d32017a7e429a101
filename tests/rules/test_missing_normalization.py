"""GA302 missing-normalization."""

import pytest
import torch.nn as nn
from rulemodels import ResMLP, audit, he, lecun, mlp, x_for

CODE = "GA302"

CASES = [
    pytest.param(lambda: mlp(10, 32, nn.ReLU, he), ("0", "warning"), id="relu-10"),
    pytest.param(lambda: mlp(16, 32, nn.GELU, he), ("0", "warning"), id="gelu-16"),
    pytest.param(lambda: mlp(9, 32, nn.ReLU, he), None, id="relu-9"),
    pytest.param(lambda: mlp(16, 32, nn.ReLU, he, norm=nn.LayerNorm), None, id="relu-layernorm"),
    pytest.param(lambda: mlp(16, 32, nn.ReLU, he, norm=nn.BatchNorm1d), None, id="relu-batchnorm"),
    pytest.param(lambda: mlp(16, 32, nn.SELU, lecun), None, id="selu-self-normalizing"),
    pytest.param(lambda: ResMLP(16), None, id="residual"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    found = audit(model, x_for(model), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def test_depth_setting_and_fix():
    from gradaudit.api import Settings

    model = mlp(9, 32, nn.ReLU, he)
    (f,) = audit(model, x_for(model), CODE, settings=Settings(deep=8))
    assert f.data["layers"] == 9 and "9 weight layers" in f.message
    assert f.fix.startswith("model[0] = nn.Sequential(model[0], nn.LayerNorm(32))")
    compile(f.fix, "<fix>", "exec")
