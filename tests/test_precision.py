"""Reduced precision under autocast: fp16 overflow located at its first layer, gradient
underflow without loss scaling, and bf16's wider range."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradaudit

pytestmark = pytest.mark.oldest


def deep_mlp(depth: int = 20, width: int = 64, std_gain: float = 3.0) -> nn.Sequential:
    """Unnormalised ReLU MLP whose activation RMS grows ~std_gain/sqrt(2) per layer."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layer = nn.Linear(width, width)
        nn.init.normal_(layer.weight, std=std_gain / width**0.5)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers)


def first_fp16_overflow(model: nn.Sequential, x: torch.Tensor) -> int:
    """Index (in the Sequential) of the first Linear whose fp16 autocast output is not
    finite, computed layer by layer without gradaudit."""
    h = x
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        for i, layer in enumerate(model):
            h = layer(h)
            if not torch.isfinite(h).all():
                return i
    raise AssertionError("no overflow")


def test_fp16_overflow_reported_at_the_layer_where_it_first_happens():
    model = deep_mlp()
    torch.manual_seed(1)
    x = torch.randn(16, 64)
    expected = first_fp16_overflow(model, x)
    assert 0 < expected < len(model) - 2  # the oracle: it overflows inside the stack
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # and float32 is fine
    report = gradaudit.audit(model, (x,), probe=True, dtype="fp16", draws=1)
    (finding,) = [f for f in report.findings if f.rule == "GA604"]
    assert finding.severity == "error" and finding.category == "precision"
    assert finding.module == str(expected)
    assert report.probe["precision"]["overflow"]["depth"] == expected // 2 + 1
    # float32 abs-max of that layer's output, recomputed here
    with torch.no_grad():
        ref = model[: expected + 1](x)
    assert finding.data["absmax_float32"] == pytest.approx(float(ref.abs().max()), rel=1e-5)
    assert finding.data["absmax_float32"] > 65504
    assert not [f for f in report.findings if f.rule == "GA601"]  # overflow, not a NaN bug
    assert report.environment["dtype"].startswith("float16")


def test_bf16_has_the_range_and_does_not_overflow():
    model = deep_mlp()
    torch.manual_seed(1)
    report = gradaudit.audit(model, (torch.randn(16, 64),), probe=True, dtype="bf16", draws=1)
    assert not [f for f in report.findings if f.rule in ("GA604", "GA601")]


def test_fp32_probe_has_no_precision_block():
    model = deep_mlp(depth=3)
    report = gradaudit.audit(model, (torch.randn(4, 64),), probe=True, draws=1)
    assert report.probe["precision"] is None


class TinyHead(nn.Module):
    """A readout with weights ~1e-9: float16 rounds them (and the gradients they carry
    back) to 0, while float32 keeps them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.head.weight.mul_(1e-8)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_gradient_underflow_without_loss_scaling():
    model = TinyHead()
    x = torch.randn(8, 32)
    # the oracle: dL/d(body output) in fp16 autocast vs float32, with the same g
    fractions = {}
    for dtype in (None, torch.float16):
        xg = x.clone().requires_grad_(True)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            h = model.body(xg)
            y = model.head(torch.tanh(h))
        (gh,) = torch.autograd.grad(
            y, [h], torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.dtype)
        )
        fractions[dtype] = float((gh == 0).float().mean())
    lost = fractions[torch.float16] - fractions[None]
    assert lost > 0.5
    report = gradaudit.audit(model, (x,), probe=True, dtype="fp16", draws=1)
    (finding,) = [f for f in report.findings if f.rule == "GA605" and f.module == "body"]
    assert finding.data["grad_underflow_fraction"] == pytest.approx(lost, abs=1e-6)
    assert "GradScaler" in finding.fix


class LargeBackward(nn.Module):
    """Forward O(1) in float16, but the gradient through ``b`` exceeds 65504."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        with torch.no_grad():
            self.b.weight.mul_(1.5e5)

    def forward(self, x):
        return self.b(self.a(x) * 1e-5)


def test_fp16_gradient_overflow_is_reported_at_the_op_whose_backward_overflows():
    model = LargeBackward()
    x = torch.randn(4, 8)
    grads = {}
    for dtype in (None, torch.float16):  # the oracle: dL/d(a(x) * 1e-5) in each dtype
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            m = model.a(x) * 1e-5
            y = model.b(m)
        (grads[dtype],) = torch.autograd.grad(y, [m], torch.randn(y.shape).to(y.dtype))
    assert torch.isfinite(grads[None]).all() and not torch.isfinite(grads[torch.float16]).all()
    report = gradaudit.audit(model, (x,), probe=True, dtype="fp16", draws=1)
    (finding,) = [f for f in report.findings if f.rule == "GA604"]
    assert finding.node == "b" and "backward" in finding.message
    assert report.probe["precision"]["grad_overflow"]["gradient_of"] == "mul"
    assert not [f for f in report.findings if f.rule == "GA601"]
