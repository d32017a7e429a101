"""GA104 activation-blowup: growth across layers and float16 overflow, against a real forward."""

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, he, measure_layers, mlp, normal, x_for

CODE = "GA104"


def big(depth=8, **kw):
    return mlp(depth, 100, nn.ReLU, normal(0.5), **kw)  # fan-in 100, sigma_w = 0.5: variance x25 per layer


CASES = [
    pytest.param(lambda: big(8), {"growth", "float16"}, id="relu-sigma0.5-8"),
    pytest.param(lambda: big(4), set(), id="relu-sigma0.5-4"),
    pytest.param(lambda: mlp(8, 100, nn.ReLU, he), set(), id="relu-he-8"),
    pytest.param(lambda: big(8, norm=nn.LayerNorm), set(), id="relu-sigma0.5-layernorm"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding_and_real_activations(build, expect):
    """Growth is reported iff the real output RMS reaches 1e3 x the first layer's, and the
    float16 finding iff some real layer output (6 sigma) exceeds 65504."""
    model = build()
    found = audit(model, x_for(model), CODE)
    kinds = {"float16" if f.data.get("float16") else "growth" for f in found}
    assert kinds == expect
    real = [a for a, _ in measure_layers(model, x_for(model)).values()]
    hit = next((i for i, a in enumerate(real) if a >= 1e3 * real[0]), None)
    assert (hit is not None) == ("growth" in expect)
    for f in found:
        if not f.data.get("float16"):
            assert f.severity == "warning" and abs(f.data["layer_index"] - (hit + 1)) <= 1


def test_float16_overflow_is_real():
    """The layer named overflows float16 in a real forward pass of the same weights."""
    model = big(8)
    (f,) = [f for f in audit(model, x_for(model), CODE) if f.data.get("float16")]
    assert f.module == "14" and f.severity == "warning" and "65504" in f.message
    torch.manual_seed(5)
    with torch.no_grad():
        y = model[: int(f.module) + 1](torch.randn(512, 100))
        before = model[: int(f.module) - 1](torch.randn(512, 100))
    assert y.abs().max() > 65504 and torch.isinf(y.half()).any()
    assert before.abs().max() < 65504  # the one before does not: the first overflow


def test_float16_model_is_an_error():
    model = big(8, dtype=torch.float16)
    found = [f for f in audit(model, x_for(model, dtype=torch.float16), CODE) if f.data.get("float16")]
    assert [(f.module, f.severity) for f in found] == [("14", "error")]
