"""Custom ``torch.autograd.Function`` s: their own backward is what the audit predicts and
measures (gradaudit.frontends.functions).

The oracle is real autograd on the model itself, read by forward hooks on its layers:
L = sum <y, g>, g ~ N(0, 1), RMS of dL/d(layer output) over draws of g.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch.autograd.function import Function

import gradaudit
from gradaudit.api import Settings, analyse, capture
from gradaudit.errors import CaptureError

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


class GradScale(Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class ScaleSetupContext(Function):
    """GradScale in the other style: ``forward`` without ctx, ``setup_context`` apart."""

    @staticmethod
    def forward(x, scale):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class ReverseGrad(Function):
    """Gradient reversal (Ganin & Lempitsky 2015): identity forward, -lambda g backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class SignSTE(Function):
    """sign(x) forward; the straight-through estimator's backward g 1[|x| <= 1]
    (Courbariaux et al. 2016): the inlined forward's derivative is 0 everywhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class Net(nn.Module):
    """Linear -> tanh -> custom Function -> Linear -> tanh -> Linear."""

    def __init__(self, apply) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.apply_fn = apply

    def forward(self, x):
        x = self.apply_fn(torch.tanh(self.a(x)))
        return self.c(torch.tanh(self.b(x)))


class LinearFn(Function):
    """x W^T + b with a hand-written backward (a fused or memory-saving kernel's shape)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x, g.sum(0)


class FunctionLinear(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n**0.5)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return LinearFn.apply(x, self.weight, self.bias)


class FunctionNet(nn.Module):
    """Two layers whose only op is a custom Function reading their parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = FunctionLinear(64), FunctionLinear(64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


FUNCTIONS = {
    "scale_1000": lambda x: GradScale.apply(x, 1000.0),
    "scale_setup_context": lambda x: ScaleSetupContext.apply(x, 0.001),
    "reverse": ReverseGrad.apply,
    "sign_ste": SignSTE.apply,
}


def _model(kind: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return Net(FUNCTIONS[kind]), (torch.randn(32, 64),)


def _autograd_grad_rms(model: nn.Module, inputs: tuple, draws: int = 4) -> dict[str, float]:
    """RMS of dL/d(output) of each layer (Linear, FunctionLinear) of ``model``, by real autograd."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, FunctionLinear))]
    sq: dict[str, float] = {}
    gen = torch.Generator().manual_seed(7)
    try:
        for _ in range(draws):
            y = model(*inputs)
            names = list(outs)
            grads = torch.autograd.grad(y, [outs[n] for n in names], torch.randn(y.shape, generator=gen))
            for n, g in zip(names, grads):
                sq[n] = sq.get(n, 0.0) + float(g.double().pow(2).mean()) / draws
    finally:
        for h in hooks:
            h.remove()
    return {n: math.sqrt(v) for n, v in sq.items()}


@pytest.mark.parametrize("frontend", ["fx", "hooks"])
@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_the_prediction_follows_the_functions_own_backward(kind, frontend):
    model, inputs = _model(kind)
    graph = capture(model, inputs, (frontend,))
    assert [n.op for n in graph].count("autograd_function") == 1
    analysis = analyse(graph, inputs, None, Settings())
    (estimate,) = analysis.estimates
    assert estimate.ok and "custom autograd.Function" in estimate.reason
    truth = _autograd_grad_rms(model, inputs)
    for name in ("a", "b", "c"):
        predicted = math.sqrt(analysis.stats[name][0].g2)
        assert truth[name] / 2 < predicted < truth[name] * 2, (name, predicted, truth[name])


def test_the_estimate_names_the_function():
    from gradaudit.report.text import render

    model, inputs = _model("scale_1000")
    report = gradaudit.audit(model, inputs)
    (estimate,) = report.estimated_ops
    assert estimate["function"] == "GradScale" and estimate["ok"]
    assert estimate["reason"] == "custom autograd.Function GradScale, run with its own backward"
    assert "estimated by local Monte Carlo: autograd_function (GradScale)" in render(report)


class Inherited(GradScale):
    """A Function that inherits its forward."""


def test_capture_restores_the_functions():
    """Each Function's own forward is back after a capture, also one that failed."""

    class Untraceable(nn.Module):
        def forward(self, x):
            x = GradScale.apply(x, 2.0)
            return Inherited.apply(x, 2.0) if x.sum() > 0 else x  # fx cannot branch on a value

    original = GradScale.__dict__["forward"]
    with pytest.raises(CaptureError):
        capture(Untraceable(), (torch.randn(4, 8),), ("fx",))
    with pytest.raises(CaptureError):
        capture(Untraceable(), (torch.randn(4, 8),), ("export",))
    capture(Untraceable(), (torch.randn(4, 8),), ("hooks",))
    assert GradScale.__dict__["forward"] is original
    assert "forward" not in Inherited.__dict__


def test_torch_checkpoint_stays_traced_through():
    """torch's own Functions (reentrant checkpoint) keep the layers inside them."""

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.b(checkpoint.checkpoint(lambda y: torch.relu(self.a(y)), x, use_reentrant=True))

    with pytest.warns(UserWarning):  # checkpoint warns: the traced input needs no grad
        graph = capture(Checkpointed(), (torch.randn(4, 16),), ("fx",))
    assert [n.op for n in graph if n.op not in ("input", "output")] == ["linear", "relu", "linear"]


def test_export_refuses_a_custom_function():
    model, inputs = _model("scale_1000")
    with pytest.raises(CaptureError, match="custom autograd.Function GradScale but not its backward"):
        capture(model, inputs, ("export",))


def test_the_probe_measures_the_functions_own_backward():
    model, inputs = _model("scale_1000")
    truth = _autograd_grad_rms(model, inputs)
    report = gradaudit.audit(model, inputs, probe=True)
    measured = {r.node: r.measured.grad_rms for r in report.layers}
    assert truth["a"] > 100 * truth["b"]  # the scale is in the truth
    for name in ("a", "b", "c"):
        assert truth[name] / 1.5 < measured[name] < truth[name] * 1.5, (name, measured[name], truth[name])


def test_a_gradient_scaling_stack_is_not_called_healthy():
    """Eight blocks of Linear -> tanh -> x4 gradient: the real gradient grows toward the
    input. Traced through, the scale vanished and the stack read as under-initialised."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))

        def forward(self, x):
            for layer in self.layers:
                x = GradScale.apply(torch.tanh(layer(x)), 4.0)
            return x

    torch.manual_seed(0)
    model, inputs = Deep(), (torch.randn(16, 64),)
    truth = _autograd_grad_rms(model, inputs)
    assert truth["layers.0"] > 100 * truth["layers.7"]
    report = gradaudit.audit(model, inputs)
    assert report.verdict == "exploding"
    assert "GA102" in {f.rule for f in report.findings}


@pytest.mark.parametrize("probe", [False, True])
def test_a_function_that_reads_parameters_is_a_layer(probe):
    """Its layers count for coverage (an audit that skipped them would call the model
    healthy on one layer of three), and the probe measures their weight gradients."""
    torch.manual_seed(0)
    model, inputs = FunctionNet(), (torch.randn(32, 64),)
    truth = _autograd_grad_rms(model, inputs)
    report = gradaudit.audit(model, inputs, probe=probe)
    rows = {r.module: r for r in report.layers}
    assert [rows[m].op for m in ("l1", "l2", "head")] == ["autograd_function", "autograd_function", "linear"]
    assert report.coverage.complete and report.coverage.layers == 3
    for name in ("l1", "l2", "head"):
        assert truth[name] / 2 < rows[name].predicted.grad_rms < truth[name] * 2, (name, truth[name])
    if probe:
        w = model.l1.weight
        y = model(*inputs)
        (gw,) = torch.autograd.grad(y, [w], torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        measured = rows["l1"].extra["measured_weight_grad_rms"]
        assert float(gw.pow(2).mean().sqrt()) / 2 < measured < float(gw.pow(2).mean().sqrt()) * 2


class Hooked(nn.Module):
    """The gradient of an activation scaled by 1000 through ``register_hook``, guarded
    the way model code guards it (no hook without a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        if x.requires_grad:
            x.register_hook(lambda g: g * 1000)
        return self.c(torch.tanh(self.b(x)))


def test_a_gradient_hook_of_the_forward_is_an_op():
    torch.manual_seed(0)
    model, inputs = Hooked(), (torch.randn(32, 64),)
    with pytest.raises(CaptureError, match=r"torch.export drops the gradient hook of the forward \(Tensor.register_hook at "):
        capture(model, inputs, ("export",))
    graph = capture(model, inputs)  # fx cannot branch on requires_grad; export refuses; the hook capture
    assert graph.frontend == "hooks"
    assert [n.op for n in graph if n.op not in ("input", "output")] == [
        "linear", "tanh", "gradient_hook", "linear", "tanh", "linear"]
    analysis = analyse(graph, inputs, None, Settings())
    truth = _autograd_grad_rms(model, inputs)
    assert truth["a"] > 100 * truth["b"]
    for name in ("a", "b", "c"):
        predicted = math.sqrt(analysis.stats[name][0].g2)
        assert truth[name] / 2 < predicted < truth[name] * 2, (name, predicted, truth[name])


class SignWeight(Function):
    """A weight binarised with a straight-through backward (quantization-aware training)."""

    @staticmethod
    def forward(ctx, w):
        return torch.sign(w) * w.abs().mean()

    @staticmethod
    def backward(ctx, g):
        return g


class BinaryLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, SignWeight.apply(self.weight), self.bias)


def test_a_function_of_parameters_alone_computes_a_weight():
    """``F.linear(x, STE.apply(self.weight))``: the linear is the layer (its weight the
    binarised one), not the Function; the audit matches autograd and stays healthy."""

    class Binary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.head = BinaryLinear(64, 64), BinaryLinear(64, 64), nn.Linear(64, 4)

        def forward(self, x):
            return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))

    torch.manual_seed(0)
    model, inputs = Binary(), (torch.randn(32, 64),)
    report = gradaudit.audit(model, inputs)
    assert [(r.module, r.op) for r in report.layers] == [("l1", "linear"), ("l2", "linear"), ("head", "linear")]
    assert report.verdict == "healthy"
    outs: dict = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y)) for n, m in model.named_children()]
    y = model(*inputs)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(y, [outs[n] for n in ("l1", "l2", "head")], torch.randn(y.shape))
    for row, g in zip(report.layers, grads):
        truth = float(g.pow(2).mean().sqrt())
        assert truth / 2 < row.predicted.grad_rms < truth * 2, (row.module, row.predicted.grad_rms, truth)


class NumpyTanh(Function):
    """A forward computed outside torch (numpy), a backward of its own."""

    @staticmethod
    def forward(ctx, x):
        import numpy as np

        return torch.from_numpy(np.tanh(x.detach().numpy())).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g * 10.0


def test_a_function_that_leaves_torch_goes_to_the_hook_capture():
    torch.manual_seed(0)
    model, inputs = Net(NumpyTanh.apply), (torch.randn(32, 64),)
    graph = capture(model, inputs)
    assert graph.frontend == "hooks"
    assert graph.notes[0].startswith("fx failed: custom autograd.Function NumpyTanh at ")
    assert "cannot run on fake tensors" in graph.notes[0]
    analysis = analyse(graph, inputs, None, Settings())
    truth = _autograd_grad_rms(model, inputs)
    for name in ("a", "b", "c"):
        predicted = math.sqrt(analysis.stats[name][0].g2)
        assert truth[name] / 2 < predicted < truth[name] * 2, (name, predicted, truth[name])
