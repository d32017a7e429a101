"""Every probe- and gradcheck-stage rule: documented, staged, and triggered by a model
built to have its problem while a healthy model does not trigger it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradaudit
import gradaudit.api
from gradaudit.rules.base import all_rules

pytestmark = pytest.mark.oldest

STAGED = {code: cls for code, cls in all_rules().items() if cls.stage in ("probe", "gradcheck")}


class _Log(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.log(self.fc(x))


class _Bad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, g):
        return g  # should be 2 x g


class _UsesBad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return _Bad.apply(self.fc(x))


def _dead():
    layer = nn.Linear(8, 64)
    nn.init.constant_(layer.bias, -5.0)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 2))


def _saturated():
    layer = nn.Linear(8, 64)
    nn.init.normal_(layer.weight, std=5.0)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(64, 2))


def _overflow():
    layers = []
    for _ in range(9):
        layer = nn.Linear(32, 32)
        nn.init.normal_(layer.weight, std=6.0 / 32**0.5)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers)


def _underflow():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-8)
    return model


def _scaled_inputs():
    """Inputs of RMS 100 where the prediction assumes 1: every layer disagrees."""
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 2))


# code -> (builder, input shape, audit options)
CASES = {
    "GA601": (_Log, (16, 8), {"probe": True}),
    "GA602": (_dead, (32, 8), {"probe": True}),
    "GA603": (_saturated, (16, 8), {"probe": True}),
    "GA604": (_overflow, (16, 32), {"probe": True, "dtype": "fp16"}),
    "GA605": (_underflow, (16, 8), {"probe": True, "dtype": "fp16"}),
    "GA606": (lambda: nn.Sequential(nn.Linear(8, 8)), (4, 8), {"probe": True}),
    "GA607": (_scaled_inputs, (16, 8), {"probe": True}),
    "GA701": (_UsesBad, (4, 8), {"gradcheck": True}),
}


def _healthy():
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))


def test_every_staged_rule_has_a_case():
    assert set(STAGED) == set(CASES)


@pytest.mark.parametrize("code", sorted(STAGED))
def test_docstring_sections(code):
    sections = STAGED[code].doc_sections()
    for heading in ("What it does", "Why is this bad?", "Example", "Use instead", "References"):
        assert sections.get(heading), (code, heading)


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires_on_its_model(code):
    build, shape, options = CASES[code]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape) * (100.0 if code == "GA607" else 1.0)
    report = gradaudit.audit(model, (x,), **options)
    found = [f for f in report.findings if f.rule == code]
    assert found, [(f.rule, f.message) for f in report.findings]
    assert all(f.category == STAGED[code].category for f in found)


@pytest.mark.parametrize("code", sorted(c for c in CASES if c != "GA606"))
def test_rule_is_silent_on_a_healthy_model(code):
    _, _, options = CASES[code]
    torch.manual_seed(0)
    report = gradaudit.audit(_healthy(), (torch.randn(16, 8),), **options)
    assert not [f for f in report.findings if f.rule == code]


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_is_silent_without_its_stage(code):
    build, shape, _ = CASES[code]
    torch.manual_seed(0)
    report = gradaudit.audit(build(), (torch.randn(*shape),))
    assert not [f for f in report.findings if f.rule == code]


def test_dead_threshold_is_configurable():
    torch.manual_seed(0)
    model = _dead()
    settings = gradaudit.api.Settings(extra={"dead_units_min": 1.01})
    report = gradaudit.audit(model, (torch.randn(16, 8),), probe=True, settings=settings)
    assert not [f for f in report.findings if f.rule == "GA602"]


def test_dead_unit_fraction_matches_direct_count():
    torch.manual_seed(0)
    model = _dead()
    with torch.no_grad():
        nn.init.uniform_(model[0].bias, -4.0, 1.0)  # a mix of dead and live units
    x = torch.randn(32, 8)
    with torch.no_grad():
        zero = (model[1](model[0](x)) == 0).float().mean(dim=0)
    expected = float((zero >= 0.7).float().mean())
    assert 0.5 <= expected < 1.0  # the oracle: most but not all units are dead
    report = gradaudit.audit(model, (x,), probe=True, draws=1)
    (finding,) = [f for f in report.findings if f.rule == "GA602"]
    assert finding.data["dead_fraction"] == pytest.approx(expected)
    assert finding.data["units"] == [64]


def test_dead_units_are_not_judged_on_fewer_than_32_samples():
    """On 16 samples a live unit (zero half the time) reads as >= 70% zero with
    probability P(Binomial(16, 1/2) >= 12) = 0.038: too noisy to call it dead."""
    torch.manual_seed(0)
    report = gradaudit.audit(_dead(), (torch.randn(16, 8),), probe=True, draws=1)
    assert not [f for f in report.findings if f.rule == "GA602"]
    report = gradaudit.audit(_dead(), (torch.randn(32, 8),), probe=True, draws=1)
    assert [f.rule for f in report.findings if f.rule == "GA602"] == ["GA602"]


def test_saturated_fraction_matches_direct_count():
    torch.manual_seed(0)
    model = _saturated()
    x = torch.randn(32, 8)
    with torch.no_grad():
        expected = float((model[0](x).abs() >= 5).float().mean())
    assert expected > 0.5
    report = gradaudit.audit(model, (x,), probe=True, draws=1)
    (finding,) = [f for f in report.findings if f.rule == "GA603"]
    assert finding.data["saturated_fraction"] == pytest.approx(expected)
