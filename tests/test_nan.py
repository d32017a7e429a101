"""NaN/Inf localisation: the first non-finite node, forward or backward, with its line."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import gradaudit
import gradaudit.api

pytestmark = pytest.mark.oldest


def _line(cls, text: str) -> int:
    """Source line of ``text`` inside ``cls`` (computed, not hard-coded)."""
    lines, start = inspect.getsourcelines(cls)
    for k, line in enumerate(lines):
        if text in line:
            return start + k
    raise AssertionError(text)


class LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        y = torch.log(h)
        return self.out(y)


class NormAtZero(nn.Module):
    """Forward finite (sqrt(0) = 0), backward not: d sqrt(s)/ds = inf at s = 0, times
    ds/dh = 2h = 0 gives NaN, which reaches the weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(1, 2)

    def forward(self, x):
        h = self.fc(x)
        r = torch.sqrt((h * h).sum(dim=-1, keepdim=True))
        return self.out(r)


class NanThenRaise(nn.Module):
    """The forward makes NaN, and a later op refuses NaN: no backward ever runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        p = torch.log(self.fc(x)).softmax(dim=-1)
        return torch.multinomial(p, 1).float() + p.sum()


class Finite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.log(torch.exp(self.fc(x)) + 1.0)


def _nan_findings(model, x):
    report = gradaudit.audit(model, (x,), probe=True, draws=1)
    return report, [f for f in report.findings if f.rule == "GA601"]


def test_log_of_negative_pre_activation_names_the_log_node_and_line():
    torch.manual_seed(0)
    model = LogOfNegative()
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert (model.fc(x) < 0).any()  # the oracle: some pre-activations are negative
    report, (finding,) = _nan_findings(model, x)
    assert finding.severity == "error" and finding.category == "nan"
    assert finding.node == "log"
    assert finding.location["line"] == _line(LogOfNegative, "torch.log(h)")
    assert finding.location["path"].endswith("test_nan.py")
    assert finding.data["phase"] == "forward" and "nan" in finding.data["value"]
    (inp,) = finding.data["inputs"]
    with torch.no_grad():
        h = model.fc(x)
    assert inp["min"] == pytest.approx(float(h.min()), rel=1e-5)
    assert inp["max"] == pytest.approx(float(h.max()), rel=1e-5)
    assert report.verdict == "nan"


def test_backward_only_nan_blames_the_sqrt():
    torch.manual_seed(0)
    model = NormAtZero()
    x = torch.randn(16, 8)
    x[3] = 0.0
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    assert torch.isfinite(y).all()  # the oracle: forward finite, weight gradient not
    (gw,) = torch.autograd.grad(y, [model.fc.weight], torch.randn(y.shape))
    assert not torch.isfinite(gw).all()
    _, (finding,) = _nan_findings(model, x)
    assert finding.data["phase"] == "backward"
    assert finding.node == "sqrt"
    graph = gradaudit.api.capture(model, (x,))
    assert graph[finding.data["gradient_of"]].op == "sum"
    assert graph["sqrt"].inputs == [finding.data["gradient_of"]]
    assert finding.location["line"] == _line(NormAtZero, "torch.sqrt((h * h)")


def test_nan_in_forward_when_backward_never_runs():
    torch.manual_seed(0)
    model = NanThenRaise()
    x = torch.randn(16, 8)
    with pytest.raises(RuntimeError):
        model(x)  # the oracle: the model itself cannot complete a forward pass
    _, (finding,) = _nan_findings(model, x)
    assert finding.node == "log" and finding.data["phase"] == "forward"
    assert finding.location["line"] == _line(NanThenRaise, "torch.log(self.fc(x))")


def test_weights_with_nan_are_reported_at_their_layer():
    torch.manual_seed(0)
    model = Finite()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    _, (finding,) = _nan_findings(model, torch.randn(4, 8))
    assert finding.node == "fc"
    (w,) = [s for s in finding.data["weights"] if s["name"] == "fc.weight"]
    assert w["nonfinite"] == 1


@pytest.mark.parametrize("model_cls", [Finite, nn.Linear])
def test_finite_models_have_no_nan_finding(model_cls):
    torch.manual_seed(0)
    model = model_cls() if model_cls is Finite else nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    _, found = _nan_findings(model, torch.randn(4, 8))
    assert found == []
