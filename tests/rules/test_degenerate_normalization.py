"""GA305 degenerate-normalization: normalizations over too few values, checked with autograd.

Oracle: a training-mode BatchNorm over two values a, b per channel outputs
+-d / sqrt(d^2 + eps) with d = (a - b) / 2 (closed form, checked against torch), and the
vanishing rule then leaves the layers behind it out instead of calling the model broken.
"""

import pytest
import torch
import torch.nn as nn

import gradaudit

CODE = "GA305"


class SqueezeExcite(nn.Module):
    """A conv block with a squeeze-and-excitation gate whose bottleneck has a BatchNorm
    on the pooled (N, C, 1, 1) features (rexnet, some mobile networks)."""

    def __init__(self, c=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.bn = nn.BatchNorm2d(c // 4)
        self.fc2 = nn.Conv2d(c // 4, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        s = x.mean((2, 3), keepdim=True)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.bn(self.fc1(s)))))
        return self.head(x.mean((2, 3)))


def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _inputs(build, shape):
    return lambda: (build(), torch.randn(*shape))


CASES = [
    pytest.param(_inputs(SqueezeExcite, (2, 3, 8, 8)), ["bn"], id="se-bottleneck-batch-2"),
    pytest.param(_inputs(_bn_mlp, (4, 8)), ["1"], id="batchnorm1d-batch-4"),
    pytest.param(_inputs(SqueezeExcite, (16, 3, 8, 8)), [], id="se-bottleneck-batch-16"),
    pytest.param(_inputs(_bn_mlp, (32, 8)), [], id="batchnorm1d-batch-32"),
]


@pytest.mark.parametrize("case, expect", CASES)
def test_finding(case, expect):
    model, x = case()
    report = gradaudit.audit(model, x, select=[CODE])
    found = [f for f in report.findings if f.rule == CODE]
    assert [layer for f in found for layer in f.data["layers"]] == expect


@pytest.mark.parametrize("seed", range(3))
def test_two_values_give_plus_minus_one_and_vanishing_does_not_blame_the_model(seed):
    model = SqueezeExcite(seed=seed)
    x = torch.randn(2, 3, 8, 8)
    h = model.fc1(torch.relu(model.stem(x)).mean((2, 3), keepdim=True))
    d = (h[0] - h[1]) / 2
    expected = d / torch.sqrt(d * d + model.bn.eps)  # gamma 1, beta 0 at init
    torch.testing.assert_close(model.bn(h)[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn(h)[1], -expected, rtol=1e-4, atol=1e-5)
    report = gradaudit.audit(model, x)
    (f,) = [f for f in report.findings if f.rule == CODE]
    assert f.data["samples"] == [2] and "set by eps" in f.message
    assert not [f for f in report.findings if f.rule == "GA101"]
