"""Numeric gradcheck: custom autograd.Functions, hooked and named modules, the whole
model; grading thresholds; kinks reported, not failed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.errors import ConfigError
from gradaudit.probe import gradcheck as gc

pytestmark = pytest.mark.oldest


class Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * (s + x * s * (1 - s))


class SwishMissingTerm(Swish):
    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s  # drops x * s * (1 - s)


class SlightlyOff(torch.autograd.Function):
    """Backward off by a relative 1e-3: 'suspicious'."""

    @staticmethod
    def forward(ctx, x):
        return x * 3.0

    @staticmethod
    def backward(ctx, g):
        return g * 3.0 * (1 + 2e-3)


class Net(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.fn = fn

    def forward(self, x):
        return self.out(self.fn.apply(self.fc(x)))


def _report(fn, **options):
    torch.manual_seed(0)
    return gradaudit.audit(Net(fn), (torch.randn(6, 8),), gradcheck=True, **options)


def _target(report, name):
    (res,) = [g for g in report.gradcheck if g["target"] == name]
    return res


def test_swish_missing_term_is_a_gradcheck_error_naming_the_function():
    report = _report(SwishMissingTerm)
    res = _target(report, "SwishMissingTerm")
    assert res["kind"] == "autograd.Function" and res["grade"] == "wrong"
    errors = [f for f in report.findings if f.rule == "GA701" and f.severity == "error"]
    assert any("SwishMissingTerm" in f.message and f.category == "gradcheck" for f in errors)
    # worst entries: both values, recomputed here from the closed form
    worst = res["worst"][0]
    assert worst["tensor"] == "input[0]"
    torch.manual_seed(0)
    model = Net(SwishMissingTerm)
    with torch.no_grad():
        x = model.fc(torch.randn(6, 8)).double()[:2]
    xi = x[tuple(worst["index"])]
    s = torch.sigmoid(xi)
    gen = torch.Generator().manual_seed(gc.SEED)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)[tuple(worst["index"])]
    assert worst["numeric"] == pytest.approx(float(v * (s + xi * s * (1 - s))), rel=1e-5)
    assert worst["autograd"] == pytest.approx(float(v * s), rel=1e-5)
    (function_finding,) = [f for f in errors if "SwishMissingTerm" in f.message]
    assert function_finding.location["path"].endswith("test_gradcheck.py")
    assert report.verdict == "gradcheck"


def test_correct_swish_passes_below_1e_7():
    report = _report(Swish)
    res = _target(report, "Swish")
    assert res["grade"] == "correct" and res["max_rel_error"] < 1e-7
    assert res["checked"] > 0
    assert not [f for f in report.findings if f.rule == "GA701"]


def test_relative_error_1e_3_is_suspicious_warning():
    report = _report(SlightlyOff)
    res = _target(report, "SlightlyOff")
    assert res["max_rel_error"] == pytest.approx(2e-3 / (2 + 2e-3), rel=1e-4)
    assert res["grade"] == "suspicious"
    (finding,) = [f for f in report.findings if f.rule == "GA701" and "SlightlyOff" in f.message]
    assert finding.severity == "warning"


@pytest.mark.parametrize(
    "rel, expected",
    [
        (0.0, "correct"),
        (9.9e-8, "correct"),
        (1e-7, "acceptable"),
        (9.9e-5, "acceptable"),
        (1e-4, "suspicious"),
        (9.9e-3, "suspicious"),
        (1e-2, "wrong"),
        (0.5, "wrong"),
        (float("nan"), "wrong"),
    ],
)
def test_grades(rel, expected):
    assert gc.grade(rel) == expected


@pytest.mark.parametrize("a, b, expected", [(1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0), (2.0, 1.0, 1 / 3)])
def test_relative_error(a, b, expected):
    assert gc.relative_error(a, b) == pytest.approx(expected)


class ClippingHook(nn.Module):
    """A module whose backward hook rescales its input gradient: a different backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.block = nn.Linear(5, 5)
        self.block.register_full_backward_hook(lambda m, gi, go: tuple(None if g is None else g * 0.5 for g in gi))

    def forward(self, x):
        return self.block(torch.tanh(self.fc(x)))


class NeutralHook(ClippingHook):
    def __init__(self) -> None:
        super().__init__()
        self.block._backward_hooks.clear()
        self.block.register_full_backward_hook(lambda m, gi, go: None)


@pytest.mark.parametrize("cls, grade", [(ClippingHook, "wrong"), (NeutralHook, "correct")])
def test_modules_with_backward_hooks_are_checked(cls, grade):
    torch.manual_seed(0)
    report = gradaudit.audit(cls(), (torch.randn(4, 5),), gradcheck=True)
    res = _target(report, "block")
    assert res["kind"] == "hooked module"
    assert res["grade"] == grade


def test_named_module_is_checked_and_unknown_name_is_config_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Sequential(nn.Linear(6, 6), nn.Tanh()))
    report = gradaudit.audit(model, (torch.randn(3, 4),), gradcheck_modules=["2"])
    res = _target(report, "2")
    assert res["kind"] == "named module" and res["grade"] == "correct"
    names = {w["tensor"] for w in res["worst"]}
    assert names <= {"input[0]", "2.0.weight", "2.0.bias"}
    with pytest.raises(ConfigError):
        gradaudit.audit(model, (torch.randn(3, 4),), gradcheck_modules=["encoder.block.9"])


def test_relu_kink_is_reported_not_failed():
    relu = nn.ReLU()
    x = torch.tensor([[0.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    res = gc.check_entries(lambda: relu(x), [("input[0]", x)])
    assert res["grade"] == "correct"
    assert res["kink_count"] == 2
    assert sorted(k["index"][1] for k in res["kinks"]) == [0, 3]


def test_whole_model_directional_check_correct_for_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    report = gradaudit.audit(model, (torch.randn(4, 6),), gradcheck=True)
    res = _target(report, "model")
    assert res["kind"] == "whole-model directional"
    assert res["grade"] == "correct" and res["max_rel_error"] < 1e-7


def test_dropout_is_off_during_the_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    report = gradaudit.audit(model, (torch.randn(4, 6),), gradcheck=True)
    assert _target(report, "model")["grade"] == "correct"
    assert model[1].training


def test_function_apply_is_left_as_found():
    """Function.apply is a classmethod up to torch 2.13 and a C classmethod_descriptor from
    2.14: the recording wrapper calls either, and puts the very same object back."""
    from torch.autograd.function import Function

    original = Function.__dict__["apply"]
    report = _report(Swish)
    assert _target(report, "Swish")["grade"] == "correct"
    assert Function.__dict__["apply"] is original

    class Raises(nn.Module):
        def forward(self, x):
            Swish.apply(x)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        gc.find_targets(Raises(), (torch.randn(2, 3),))
    assert Function.__dict__["apply"] is original


class NanBackward(torch.autograd.Function):
    """A finite forward whose hand-written backward divides by zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 2.0 * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2.0 * (x - x) / (x - x)  # 0/0


def test_nan_from_a_backward_is_a_wrong_gradient_with_numbers_kept_as_floats():
    report = _report(NanBackward)
    res = _target(report, "NanBackward")
    assert res["grade"] == "wrong" and res["max_rel_error"] == float("inf")
    worst = res["worst"][0]
    assert isinstance(worst["autograd"], float) and worst["autograd"] != worst["autograd"]
    assert worst["numeric"] != 0.0 and worst["numeric"] == worst["numeric"]
    (finding,) = [f for f in report.findings if f.rule == "GA701" and "NanBackward" in f.message]
    assert finding.severity == "error" and "autograd nan vs numeric" in finding.message


NAN_FORWARD = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.log(self.fc(x)))


torch.manual_seed(0)
model = Net()
example_inputs = (torch.randn(4, 8),)
"""


@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "html", "github"])
def test_probe_and_gradcheck_of_a_nan_forward_end_to_end(tmp_path, fmt):
    """torch.log of a linear layer's output is NaN for negative entries: the probe reports
    where (GA601), the gradcheck has no finite derivative to compare and says so, and
    every format renders the NaN (JSON and SARIF as strings)."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "nanlog.py").write_text(NAN_FORWARD)
    out = tmp_path / f"report.{fmt}"
    proc = subprocess.run(
        [sys.executable, "-m", "gradaudit", "check", "nanlog.py", "--probe", "--gradcheck", "--format", fmt,
         "-o", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "GA601" in text
    if fmt == "json":
        data = json.loads(text)  # strict JSON: no bare NaN
        (model,) = [g for g in data["gradcheck"] if g["target"] == "model"]
        assert model["grade"] == "unchecked" and model["nonfinite"] == 1
        assert not [f for f in data["findings"] if f["rule"] == "GA701"]
    if fmt == "sarif":
        json.loads(text)


class ReverseGradient(torch.autograd.Function):
    """A gradient reversal layer: its backward is deliberately not the derivative."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


def test_a_function_mismatch_is_reported_at_the_function_not_again_for_the_whole_model():
    report = _report(ReverseGradient)
    assert {g["kind"]: g["grade"] for g in report.gradcheck} == {
        "autograd.Function": "wrong", "whole-model directional": "wrong"}
    (finding,) = [f for f in report.findings if f.rule == "GA701"]
    assert "ReverseGradient" in finding.message


class Adversarial(nn.Module):
    """The line that applies the deliberate Function carries the suppression."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = ReverseGradient.apply(self.fc(x))  # gradaudit: noqa[GA701]
        return self.out(x)


def test_a_deliberate_backward_is_suppressed_on_its_line():
    torch.manual_seed(0)
    report = gradaudit.audit(Adversarial(), (torch.randn(6, 8),), gradcheck=True)
    assert not [f for f in report.findings if f.rule == "GA701"]
    assert [s["rule"] for s in report.suppressed] == ["GA701"]
    assert report.verdict != "gradcheck"
