"""Functional layers (gradaudit/frontends/patterns.py: functional_layers): a network whose
layers multiply by parameters through ``F.linear``, ``F.conv2d``, ``F.embedding`` or
``x @ self.W`` has as many weight layers as the same network built from modules, their
statistics agree with real autograd, and a deep saturating one is never called healthy
(it had no layers at all, and passed as healthy, before)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from measure import measure

import gradaudit
from gradaudit.api import Settings, analyse, capture
from gradaudit.probe.recording import sumsq, sums_of_squares
from gradaudit.rules.evidence.fixes import init_fix

DEPTH, WIDTH = 12, 48


class OwnLinear(nn.Module):
    """A hand-written linear layer, as LoRA, quantisation and tutorial code write it."""

    def __init__(self, n: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) * std)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class OwnLayers(nn.Module):
    def __init__(self, act=torch.sigmoid, std: float = 0.05) -> None:
        super().__init__()
        self.layers = nn.ModuleList(OwnLinear(WIDTH, std) for _ in range(DEPTH))
        self.act = act

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x


class Weights(nn.Module):
    """Weights in a ParameterList, used by ``F.linear``, ``x @ W`` or ``x @ W.t()``."""

    def __init__(self, form: str, act=torch.sigmoid, std: float = 0.05) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH) * std) for _ in range(DEPTH))
        self.form, self.act = form, act

    def forward(self, x):
        for w in self.w:
            y = {"linear": lambda: F.linear(x, w), "matmul": lambda: x @ w, "matmul_t": lambda: x @ w.t(),
                 "mm": lambda: torch.mm(x, w), "einsum": lambda: torch.einsum("bi,ij->bj", x, w),
                 "addmm": lambda: torch.addmm(torch.zeros(WIDTH), x, w),
                 "bmm": lambda: torch.bmm(x.unsqueeze(1), w.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1))[:, 0],
                 }[self.form]()
            x = self.act(y)
        return x


class WeightNormed(nn.Module):
    """Hand-written weight norm, w = g v / ||v|| per row (Salimans & Kingma 2016): the
    weight is computed from two parameters."""

    def __init__(self, act=torch.sigmoid, gain: float = 0.35) -> None:
        super().__init__()
        self.v = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH)) for _ in range(DEPTH))
        self.g = nn.ParameterList(nn.Parameter(torch.full((WIDTH, 1), gain)) for _ in range(DEPTH))
        self.act = act

    def forward(self, x):
        for v, g in zip(self.v, self.g):
            x = self.act(F.linear(x, g * v / v.norm(dim=1, keepdim=True)))
        return x


class OwnConv(nn.Module):
    def __init__(self, depth: int = 6, channels: int = 8) -> None:
        super().__init__()
        self.weight = nn.ParameterList(
            nn.Parameter(torch.randn(channels, 3 if i == 0 else channels, 3, 3) * math.sqrt(2 / (9 * channels)))
            for i in range(depth)
        )

    def forward(self, x):
        for w in self.weight:
            x = F.relu(F.conv2d(x, w, padding=1))
        return x


class OwnEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(100, WIDTH))
        self.head = OwnLinear(WIDTH, 1 / math.sqrt(WIDTH))

    def forward(self, ids):
        return self.head(F.embedding(ids, self.table))


def _builders():
    yield "own-linear", OwnLayers, lambda: torch.randn(8, WIDTH), DEPTH
    for form in ("linear", "matmul", "matmul_t", "mm", "einsum", "addmm", "bmm"):
        yield f"weights-{form}", (lambda form=form: Weights(form)), lambda: torch.randn(8, WIDTH), DEPTH
    yield "weight-norm", WeightNormed, lambda: torch.randn(8, WIDTH), DEPTH
    yield "conv2d", OwnConv, lambda: torch.randn(2, 3, 8, 8), 6
    yield "embedding", OwnEmbedding, lambda: torch.randint(0, 100, (4, 5)), 2


CASES = [pytest.param(build, x, n, id=name) for name, build, x, n in _builders()]


@pytest.mark.parametrize("build, make_x, layers", CASES)
def test_every_functional_layer_is_a_weight_layer_with_statistics(build, make_x, layers):
    torch.manual_seed(0)
    model, x = build(), make_x()
    analysis = analyse(capture(model, x), x, None, Settings())
    weight_layers = analysis.weight_layers()
    assert len(weight_layers) == layers
    for node in weight_layers:
        s = analysis.stat(node.name)
        assert s is not None and math.isfinite(s.act_rms) and math.isfinite(s.grad_rms), node.name


@pytest.mark.parametrize("build, make_x, layers", CASES)
def test_functional_layers_agree_with_autograd(build, make_x, layers):
    """Per layer, predicted activation and gradient RMS within 2x of real autograd (a
    relu network at a gain that keeps gradients measurable in float32)."""
    torch.manual_seed(0)
    if build is OwnLayers:
        model = OwnLayers(torch.relu, math.sqrt(2 / WIDTH))
    elif build in (OwnConv, OwnEmbedding):
        model = build()
    elif build is WeightNormed:
        model = WeightNormed(torch.relu, math.sqrt(2))
    else:
        model = build()
        model.act = torch.relu
        with torch.no_grad():
            for w in model.w:
                w.normal_(0, math.sqrt(2 / WIDTH))
    x = make_x()
    analysis = analyse(capture(model, x), x, None, Settings())
    real = measure(model, x, draws=4, redraw=x.is_floating_point())
    for node in analysis.weight_layers():
        s = analysis.stat(node.name)
        act, grad = real[node.name]
        assert abs(math.log10(s.act_rms / act)) < math.log10(2), node.name
        assert abs(math.log10(s.grad_rms / grad)) < math.log10(2), node.name


@pytest.mark.parametrize("frontend", ["fx", "export", "hooks"])
@pytest.mark.parametrize("form", ["own-linear", "weights-linear", "weights-matmul", "weights-matmul_t", "weight-norm"])
def test_a_deep_sigmoid_network_of_functional_layers_is_never_healthy(monkeypatch, frontend, form):
    """12 sigmoid layers at std 0.05: the gradient falls about 10x per layer (the same
    network of nn.Linear is called vanishing), whichever frontend captures it, and also
    where torch.export or the module hooks fold a weight computed from parameters (a
    transpose, a weight norm) into a constant."""
    from gradaudit.frontends import chain

    monkeypatch.setattr(chain, "FRONTENDS", tuple(f for f in chain.FRONTENDS if f[0] == frontend))
    torch.manual_seed(0)
    build = {"own-linear": OwnLayers, "weight-norm": WeightNormed}.get(form) or (lambda: Weights(form.split("-")[1]))
    report = gradaudit.audit(build(), torch.randn(8, WIDTH))
    assert report.verdict == "vanishing"
    assert len(report.layers) == DEPTH
    assert "GA101" in {f.rule for f in report.findings}


@pytest.mark.parametrize("frontend", ["fx", "export", "hooks"])
@pytest.mark.parametrize("build", [lambda: Weights("linear"), OwnLayers, lambda: Weights("matmul")],
                         ids=["weights-linear", "own-linear", "weights-matmul"])
def test_the_probe_measures_functional_layers_and_their_weight_gradients(monkeypatch, frontend, build):
    """Whichever frontend captured the model (the fx replay, or the model's own forward
    watched through the calls that read each parameter), every functional layer is
    measured; the first layer's gradient is 1e-13-small and finite, not 0, and agrees
    with the prediction within 2x; the weight gradients are those of the parameters each
    layer reads."""
    from gradaudit.frontends import chain

    monkeypatch.setattr(chain, "FRONTENDS", tuple(f for f in chain.FRONTENDS if f[0] == frontend))
    torch.manual_seed(0)
    report = gradaudit.audit(build(), torch.randn(8, WIDTH), probe=True)
    assert report.frontend == frontend
    assert len(report.layers) == DEPTH and all(layer.measured is not None for layer in report.layers)
    first, last = report.layers[0], report.layers[-1]
    assert first.measured.grad_rms < 1e-8 * last.measured.grad_rms
    assert first.measured.grad_rms > 0
    assert abs(math.log10(first.predicted.grad_rms / first.measured.grad_rms)) < math.log10(2)
    assert first.extra["measured_weight_grad_rms"] > 0


class SqueezedDepthwise(nn.Module):
    """Mamba's causal convolution: an ``nn.Conv1d``'s weight squeezed and unsqueezed
    again on its way into ``F.conv1d`` (a weight computed from a parameter), with a
    linear layer between."""

    def __init__(self, depth: int = 4, channels: int = 16) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 4, groups=channels, padding=3) for _ in range(depth))
        self.mix = nn.ModuleList(nn.Linear(channels, channels) for _ in range(depth))

    def forward(self, x):
        for conv, mix in zip(self.convs, self.mix):
            w = conv.weight.squeeze(1)
            x = F.conv1d(x, w.unsqueeze(1), conv.bias, padding=3, groups=x.shape[1])[..., : x.shape[-1]]
            x = mix(F.silu(x).transpose(1, 2)).transpose(1, 2)
        return x


@pytest.mark.parametrize("frontend", ["export", "hooks"])
@pytest.mark.parametrize("build, make_x", [(SqueezedDepthwise, lambda: torch.randn(4, 16, 12)),
                                           (lambda: WeightNormed(torch.relu, math.sqrt(2)), lambda: torch.randn(8, WIDTH))],
                         ids=["squeezed-depthwise", "weight-norm"])
def test_the_probe_measures_layers_whose_weight_is_computed(monkeypatch, frontend, build, make_x):
    """The model's own forward, watched through its calls: a layer whose weight is
    computed from parameters is measured too (its calls are followed from the parameters
    they read; it was left unmeasured, a miss), and agrees with the prediction."""
    from gradaudit.frontends import chain

    monkeypatch.setattr(chain, "FRONTENDS", tuple(f for f in chain.FRONTENDS if f[0] == frontend))
    torch.manual_seed(0)
    report = gradaudit.audit(build(), make_x(), probe=True, draws=4)
    assert report.frontend == frontend
    for layer in report.layers:
        assert layer.measured is not None and math.isfinite(layer.measured.grad_rms), layer.node
        for what in ("act_rms", "grad_rms"):
            pred, real = getattr(layer.predicted, what), getattr(layer.measured, what)
            assert abs(math.log10(pred / real)) < math.log10(2), (layer.node, what, pred, real)


def test_a_fix_names_a_parameter_layer_by_the_parameter():
    torch.manual_seed(0)
    model = Weights("linear")
    x = torch.randn(8, WIDTH)
    analysis = analyse(capture(model, x), x, None, Settings())
    first = analysis.weight_layers()[0]
    assert first.module == "w.0"
    assert init_fix(analysis, first).startswith("nn.init.kaiming_normal_(model.w[0], ")
    own = OwnLayers()
    analysis = analyse(capture(own, x), x, None, Settings())
    assert init_fix(analysis, analysis.weight_layers()[0]).startswith("nn.init.kaiming_normal_(model.layers[0].weight, ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_norms_do_not_underflow(dtype):
    """sqrt(n) * 1e-30 for n entries of 1e-30, where float32 squares underflow to 0."""
    t = torch.full((400,), 1e-30, dtype=dtype)
    expected = 20 * float(t[0].double())
    assert float(sumsq(t)) == pytest.approx(expected, rel=1e-6)
    assert sums_of_squares([t])[0] == pytest.approx(expected**2, rel=1e-6)


class LoRA(nn.Module):
    """LoRA written by hand (Hu et al. 2021): y = W x + (alpha / r) B A x with B = 0, as a
    functional layer with its adapters (``functional``) or as three nn.Linear."""

    def __init__(self, functional: bool, d: int = 32, r: int = 4) -> None:
        super().__init__()
        self.functional = functional
        self.base = nn.Linear(d, d)
        nn.init.kaiming_normal_(self.base.weight, nonlinearity="relu")
        self.A, self.B = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        if self.functional:
            return F.linear(x, self.base.weight, self.base.bias) + (x @ self.A.weight.t() @ self.B.weight.t()) * 2.0
        return self.base(x) + self.B(self.A(x)) * 2.0


class LoRANet(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LoRA(functional) for _ in range(6))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


def test_a_hand_written_lora_is_judged_as_the_module_one():
    """The zero-initialised B of each adapter is a closed gate (GA205) in both forms; the
    findings are the same rules at the same severities, and no vanishing verdict."""
    reports = []
    for functional in (False, True):
        torch.manual_seed(0)
        reports.append(gradaudit.audit(LoRANet(functional), torch.randn(8, 32)))
    modules, functional = reports
    assert sorted((f.rule, f.severity) for f in functional.findings) == sorted((f.rule, f.severity) for f in modules.findings)
    (gate,) = [f for f in functional.findings if f.rule == "GA205"]
    assert all(f"'layers.{i}.B'" in gate.message for i in range(6))
    assert functional.verdict == modules.verdict != "vanishing"
