"""Rows whose channels move together (gradaudit/propagation/rows.py), against real autograd.

A softmax over class logits is blind to what every logit of a row shares. A head whose
weight rows are all equal (a constant initialisation) gives every class the same logit,
however large its variance: the softmax is uniform, its backward sums to zero along the
row, and nothing below that head gets a gradient. Independent logits of that variance
would saturate the softmax and pass back nothing at all -- an audit that then says "the
loss reaches no parameter" instead of naming the symmetric initialisation.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measure  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.api import Settings, analyse, capture  # noqa: E402
from gradaudit.ir import Stats  # noqa: E402
from gradaudit.propagation import rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_X = math.log10(2.0)


class ConstantMLP(nn.Module):
    """Three Linear layers at the constant 0.02 (as ONNX's light model zoo stores them)."""

    def __init__(self, head: float = 0.02) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)
        for layer, value in ((self.a, 0.02), (self.b, 0.02), (self.c, head)):
            nn.init.constant_(layer.weight, value)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return torch.softmax(self.c(F.relu(self.b(F.relu(self.a(x))))), -1)


class ConstantSqueezeTail(nn.Module):
    """SqueezeNet's classifier: conv -> ReLU -> global average pool -> softmax over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 32, 3, padding=1)
        self.classifier = nn.Conv2d(32, 10, 1)
        for conv in (self.features, self.classifier):
            nn.init.constant_(conv.weight, 0.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(F.relu(self.classifier(F.relu(self.features(x)))), 1)
        return torch.softmax(y, 1)


def _predicted_and_measured(model: nn.Module, inputs: tuple) -> dict[str, tuple[float, float, float, float]]:
    analysis = analyse(capture(model, inputs), inputs, None, Settings())
    meas = measure(model, inputs, draws=4)
    out = {}
    for node in analysis.layers():
        s = analysis.stat(node.name)
        out[node.name] = (s.act_rms, s.grad_rms, *meas[node.name])
    return out


@pytest.mark.parametrize("seed", [0, 7, 17])
@pytest.mark.parametrize(
    "model, shape, head, below",
    [
        (ConstantMLP, (32, 64), "c", ["a", "b"]),
        (ConstantSqueezeTail, (4, 3, 8, 8), "classifier", ["features"]),
    ],
    ids=["linear-head", "conv-head-pooled"],
)
def test_equal_rows_under_a_softmax_pass_back_nothing_below_the_head(model, shape, head, below, seed):
    torch.manual_seed(seed)
    stats = _predicted_and_measured(model(), (torch.randn(*shape),))
    act, grad, real_act, real_grad = stats[head]
    # the head's gradient is the uniform softmax's: within 2x of real autograd
    assert real_grad > 0 and abs(math.log10(grad / real_grad)) < TWO_X, (grad, real_grad)
    for name in below:
        _, grad_below, _, real_below = stats[name]
        # what is left is rounding: float32's in real autograd, float64's in the prediction
        assert real_below < 1e-5 * real_grad, (name, real_below, real_grad)
        assert grad_below < 1e-9 * grad, (name, grad_below, grad)


def test_equal_rows_add_up_coherently_in_the_forward():
    """A layer fed equal channels sums them coherently: Var[y] = (sum_j W_ij)^2 Var[x]."""
    torch.manual_seed(0)
    stats = _predicted_and_measured(ConstantMLP(), (torch.randn(32, 64),))
    for name, (act, _, real_act, _) in stats.items():
        assert abs(math.log10(act / real_act)) < TWO_X, (name, act, real_act)


def test_the_audit_names_the_initialisation_not_an_incomplete_analysis():
    torch.manual_seed(0)
    report = gradaudit.audit(ConstantMLP(), (torch.randn(32, 64),))
    assert report.verdict != "incomplete" and not report.coverage.gaps
    assert {f.rule for f in report.findings if f.severity == "error"} >= {"GA204", "GA101"}
    assert report.exit_code("error") == 1


def test_a_random_head_keeps_its_prediction():
    """Only the row-mean direction of the head's gradient is removed: for random weights
    that is 1/n of its power, and the prediction still follows real autograd."""
    torch.manual_seed(0)
    stats = _predicted_and_measured(ConstantMLP(head=0.0).apply(_xavier), (torch.randn(32, 64),))
    for name, (act, grad, real_act, real_grad) in stats.items():
        assert abs(math.log10(act / real_act)) < TWO_X, (name, act, real_act)
        assert abs(math.log10(grad / real_grad)) < TWO_X, (name, grad, real_grad)


def _xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)


@pytest.mark.parametrize("scale_of_shared", [0.0, 1.0, 10.0])
def test_dense_spread_against_sampled_rows(scale_of_shared):
    """rows.dense against the spread of sampled rows of y = W x: inputs independent across
    channels, a weight whose rows share a part (``scale_of_shared`` times a common row)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, generator=gen) / math.sqrt(32) + scale_of_shared * torch.randn(1, 32, generator=gen)
    b = torch.randn(48, generator=gen)
    var_in = torch.rand(32, generator=gen, dtype=torch.float64) + 0.5
    x = torch.randn(200_000, 32, generator=gen, dtype=torch.float64) * var_in.sqrt()
    y = x @ w.double().t() + b.double()
    sampled = float(((y - y.mean(1, keepdim=True)) ** 2).mean())
    predicted = rows.dense(w, b, var_in, b.double()).value()  # zero-mean inputs: E[y] = b
    assert abs(predicted / sampled - 1) < 0.02, (predicted, sampled)


def test_rows_equal_exactly_after_centring():
    """Centring against the first row leaves no rounding residue for equal rows (the mean
    of 256 copies of 0.02 in float32 is not 0.02)."""
    w = torch.full((256, 100), 0.02)
    assert rows.equal_rows(w)
    assert float(rows.centred(w).abs().max()) == 0.0
    assert rows.dense(w, None, torch.ones(100, dtype=torch.float64), torch.zeros(256, dtype=torch.float64)).value() == 0.0
    w[3, 7] += 1e-3
    assert not rows.equal_rows(w)
    assert rows.dense(w, None, torch.ones(100, dtype=torch.float64), torch.zeros(256, dtype=torch.float64)).value() > 0


def test_untracked_rows_stay_untracked():
    assert Stats(mean=0.0, m2=1.0).spread() is None and not Stats(mean=0.0, m2=1.0).equal_rows()


class ConstantIntoRMSNorm(nn.Module):
    """An equal-rows layer (random biases: its rows are not equal) normalised by an
    RMSNorm, whose backward removes only the x_hat direction, not the row mean: the
    gradient below the layer, w_j sum_i g_i, is not 0."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(64, 64)
        self.a = nn.Linear(64, 64)
        nn.init.constant_(self.a.weight, 0.02)
        nn.init.normal_(self.a.bias)
        self.norm = nn.RMSNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.norm(self.a(self.b(x))))


def test_an_rmsnorm_keeps_the_row_mean_of_its_gradient():
    torch.manual_seed(0)
    stats = _predicted_and_measured(ConstantIntoRMSNorm(), (torch.randn(32, 64),))
    act, grad, real_act, real_grad = stats["b"]
    assert real_grad > 1e-3 * stats["head"][3], (real_grad, stats["head"])
    assert abs(math.log10(grad / real_grad)) < TWO_X, (grad, real_grad)
