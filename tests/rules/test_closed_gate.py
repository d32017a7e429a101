"""GA205 closed-gate: designs that start a factor at zero on purpose, judged opened.

Oracles: at step 0 the real gradient behind a zero head is exactly 0 (autograd), and the
opened prediction GA101/GA102 judge agrees with real autograd on the model whose closed
factors hold the opened values.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
from rulemodels import FixupBlock, mlp, zero_classifier

import gradaudit
from gradaudit.api import Settings, analyse, capture

CODE = "GA205"


class LayerScale(nn.Module):
    """ConvNeXt / CaiT residual blocks: x + gamma * f(x), gamma = 1e-6 per channel."""

    def __init__(self, depth=6, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fs = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                 for _ in range(depth)])
        self.gammas = nn.ParameterList([nn.Parameter(1e-6 * torch.ones(d)) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for f, g in zip(self.fs, self.gammas):
            x = x + g * f(x)
        return self.head(x)


class SkipInit(nn.Module):
    """De & Smith's SkipInit: x + alpha * f(x) with a scalar alpha = 0, no normalization."""

    def __init__(self, depth=6, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fs = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(depth)])
        self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(depth)])

    def forward(self, x):
        for f, a in zip(self.fs, self.alphas):
            x = x + a * f(x)
        return x


class ZeroGammaBN(nn.Module):
    """ResNet blocks whose last BatchNorm starts at gamma = 0 (Goyal et al. 2017)."""

    def __init__(self, depth=4, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            bn = nn.BatchNorm1d(d)
            nn.init.zeros_(bn.weight)
            self.blocks.append(nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d), bn))

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return x


class AdaLNZero(nn.Module):
    """DiT's adaLN-Zero: a zero-initialised layer makes each block's shift, scale and gate."""

    def __init__(self, depth=4, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norms = nn.ModuleList([nn.LayerNorm(d, elementwise_affine=False) for _ in range(depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                   for _ in range(depth)])
        self.mods = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(depth)])
        for m in self.mods:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, c):
        for norm, f, mod in zip(self.norms, self.mlps, self.mods):
            shift, scale, gate = mod(torch.nn.functional.silu(c)).chunk(3, dim=-1)
            x = x + gate * f(norm(x) * (1 + scale) + shift)
        return x


CASES = [
    pytest.param(zero_classifier, {"zero-weight": ["2"]}, id="zero-head"),
    pytest.param(FixupBlock, {"zero-weight": ["b"]}, id="fixup-zero-last-layer"),
    pytest.param(LayerScale, {"small-scale": [f"gammas.{i}" for i in range(6)]}, id="layer-scale"),
    pytest.param(SkipInit, {"small-scale": [f"alphas.{i}" for i in range(6)]}, id="skipinit"),
    pytest.param(ZeroGammaBN, {"zero-norm-gamma": [f"blocks.{i}.4" for i in range(4)]}, id="zero-gamma-bn"),
    pytest.param(AdaLNZero, {"zero-weight": [f"mods.{i}" for i in range(4)]}, id="adaln-zero"),
    pytest.param(lambda: mlp(3, 32, nn.ReLU), {}, id="default-init"),
    # the zero hidden layer cuts the network (GA204); only the zero head is a gate
    pytest.param(lambda: mlp(3, 32, nn.ReLU, nn.init.zeros_), {"zero-weight": ["4"]}, id="zero-hidden-layer-no-gate"),
]


def _inputs(model, batch=8):
    x = torch.randn(batch, 32)
    return (x, torch.randn(batch, 32)) if isinstance(model, AdaLNZero) else (x,)


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    report = gradaudit.audit(model, _inputs(model), select=[CODE])
    found = {f.data["kind"]: f.data["gates"] for f in report.findings if f.rule == CODE}
    assert found == expect
    assert all(f.severity == "info" for f in report.findings)


@pytest.mark.parametrize("build", [zero_classifier, AdaLNZero, SkipInit])
def test_gradient_behind_a_closed_gate_is_exactly_zero_at_step_0(build):
    model = build()
    inputs = _inputs(model)
    out = model(*inputs)
    (out * torch.randn_like(out)).sum().backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.weight.grad.abs().max() == 0.0


def _opened_model(model, analysis):
    """A copy of ``model`` whose closed factors hold the values the opened graph uses."""
    opened = copy.deepcopy(model)
    by_name = {n.name: n for n in analysis.opened.graph}
    with torch.no_grad():
        for gate in analysis.gates:
            if gate.param_node is not None:
                value = by_name[gate.param_node].params["value"]
                opened.get_parameter(gate.param).copy_(value)
            else:
                node = by_name[gate.node]
                opened.get_submodule(node.module).get_parameter(gate.param).copy_(node.params[gate.param])
    return opened


@pytest.mark.parametrize("build", [zero_classifier, LayerScale, SkipInit, ZeroGammaBN, AdaLNZero])
def test_opened_prediction_agrees_with_autograd_on_the_opened_model(build):
    from measure import measure

    model = build()
    inputs = _inputs(model, batch=64)  # BatchNorm's batch statistics: the large-batch regime
    analysis = analyse(capture(model, inputs), inputs, None, Settings())
    assert analysis.gates and analysis.opened is not None
    measured = measure(_opened_model(model, analysis), inputs, draws=8)
    for node in analysis.weight_layers():
        s = analysis.opened.stat(node.name)
        act, grad = measured[node.name]
        assert abs(math.log10(s.act_rms / act)) < math.log10(2), node.name
        assert abs(math.log10(s.grad_rms / grad)) < math.log10(2), node.name


def test_deep_model_with_zero_head_gets_no_vanishing_error():
    """A 12-layer tanh MLP at LeCun init (critical for tanh) with a zero head (torchvision
    ViT's head init): the gradient behind the head is exactly 0, yet the model trains;
    GA101 judges it opened."""
    torch.manual_seed(0)
    layers = [m for _ in range(12) for m in (nn.Linear(64, 64), nn.Tanh())]
    for m in layers[::2]:
        nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
    head = nn.Linear(64, 10)
    nn.init.zeros_(head.weight)
    model = nn.Sequential(*layers, head)
    report = gradaudit.audit(model, (torch.randn(8, 64),))
    assert not [f for f in report.findings if f.severity == "error"]
    assert [f.rule for f in report.findings if f.rule == "GA205"] == ["GA205"]
    assert report.judged[0] == "predicted with closed gates opened"


def _growing_mlp(zero_head: bool) -> nn.Sequential:
    """12 ReLU layers at twice He's standard deviation: the gradient grows ~2x per layer
    toward the input."""
    torch.manual_seed(0)
    layers = [m for _ in range(12) for m in (nn.Linear(64, 64), nn.ReLU())]
    for m in layers[::2]:
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        m.weight.data.mul_(2.0)
    head = nn.Linear(64, 10)
    if zero_head:
        nn.init.zeros_(head.weight)
    return nn.Sequential(*layers, head)


def test_past_the_limit_with_gates_opened_is_a_warning():
    """The same growth is an error on the open model and a warning when only the what-if
    with the zero head opened shows it (the gates open gradually, not all at once)."""
    x = (torch.randn(8, 64),)
    (open_finding,) = [f for f in gradaudit.audit(_growing_mlp(False), x).findings if f.rule == "GA102"]
    assert open_finding.severity == "error" and open_finding.data["decades"] >= 3
    report = gradaudit.audit(_growing_mlp(True), x)
    (gated,) = [f for f in report.findings if f.rule == "GA102"]
    assert gated.severity == "warning" and gated.data["source"] == "predicted with closed gates opened"
    assert gated.data["decades"] >= 3 and "not all at once" in gated.message
    assert not [f for f in report.findings if f.severity == "error"]
