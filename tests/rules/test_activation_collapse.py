"""GA103 activation-collapse: failing and passing models, checked against a real forward pass."""

import pytest
import torch
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


class PostLNSmallBranches(nn.Module):
    """Post-LN blocks norm(x + W2 relu(W1 x)) whose output projections W2 start at
    N(0, 1e-4^2): each branch's output is tiny, and the norm after the sum restores the
    scale of what the next block reads."""

    def __init__(self, depth=4, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.ModuleList([nn.Linear(d, d) for _ in range(depth)])
        self.w2 = nn.ModuleList([nn.Linear(d, d) for _ in range(depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        for w in self.w2:
            nn.init.normal_(w.weight, std=1e-4)
            nn.init.zeros_(w.bias)

    def forward(self, x):
        for w1, w2, norm in zip(self.w1, self.w2, self.norms):
            x = norm(x + w2(torch.relu(w1(x))))
        return x


@pytest.mark.parametrize("probe", [False, True])
def test_small_branch_into_a_norm_is_no_collapse(probe):
    """A layer whose output a norm rescales does not pass its scale on: real RMS at the
    small projections is <= 1e-3 of the first layer's, at the layers after the norms it
    is not, and GA103 stays silent (statically and on the probe's measurement)."""
    model = PostLNSmallBranches()
    real = measure_layers(model, x_for(model))
    first = real["w1.0"][0]
    assert all(real[f"w2.{i}"][0] <= 1e-3 * first for i in range(4))
    assert all(real[f"w1.{i}"][0] >= 0.5 * first for i in range(4))
    assert audit(model, x_for(model), CODE, probe=probe) == []


def test_probe_decides_on_the_measured_activations():
    """With the probe, the finding quotes the measured RMS."""
    model = mlp(30, 64, nn.ReLU, nn.init.xavier_normal_, bias=False)
    (f,) = audit(model, x_for(model), CODE, probe=True)
    real = [a for a, _ in measure_layers(model, x_for(model)).values()]
    assert f.message.startswith("measured activation RMS falls")
    assert f.data["ratio"] == pytest.approx(real[f.data["layer_index"] - 1] / real[0], rel=0.3)
