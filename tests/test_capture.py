"""Capture: how model code the way people write it reaches the analysis.

Every model here is audited end to end (:func:`gradaudit.audit`) and its predicted
statistics are compared, layer by layer, with real autograd measured by forward hooks
(:func:`measure.measure_modules`, which shares no code with the capture or the
propagation): every layer that owns parameters must carry finite predicted statistics
within 2x of the measured ones (act and grad RMS).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measure_modules  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.errors import CaptureError, ModelCallError  # noqa: E402
from gradaudit.frontends import chain, export, fx, hooks  # noqa: E402
from gradaudit.propagation.engine import propagate  # noqa: E402

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

TWO_X = math.log10(2.0)


def agreement(report, model, inputs, draws: int = 4) -> list[str]:
    """Rows that fail: a layer without finite predictions, or off by more than 2x."""
    measured = measure_modules(model, inputs, draws=draws)
    calls: dict[str, int] = {}
    bad, rows = [], []
    for layer in report.layers:
        k = calls.get(layer.module, 0)
        calls[layer.module] = k + 1
        m = measured.get((layer.module, k))
        p = layer.predicted
        if m is None:
            bad.append(f"{layer.module}: not measured")
            continue
        row = f"{layer.module}#{k}: act {p.act_rms:.4g} vs {m[0]:.4g}, grad {p.grad_rms:.4g} vs {m[1]:.4g}"
        rows.append(row)
        for pred, meas in ((p.act_rms, m[0]), (p.grad_rms, m[1])):
            if not (math.isfinite(pred) and pred > 0 and meas > 0) or abs(math.log10(pred / meas)) > TWO_X:
                bad.append(row)
                break
    print("\n".join(rows))
    return bad


def audited(model, inputs, frontend: str | None = None, layers: int | None = None, **kw):
    """Audit, check it covers every layer and agrees with autograd; return the report."""
    report = gradaudit.audit(model, inputs, **kw)
    assert report.complete, report.coverage.sentence()
    if frontend is not None:
        assert report.frontend == frontend, report.capture_notes
    if layers is not None:
        assert len(report.layers) == layers, [layer.module for layer in report.layers]
    bad = agreement(report, model, inputs)
    assert not bad, "\n".join(bad)
    return report


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 16)


# ----------------------------------------------------------------------------- constants
class FloatDefault(TwoLayer):
    def forward(self, x, scale: float = 1.0):
        return self.b(torch.relu(self.a(x)) * scale)


class BoolFlag(TwoLayer):
    def forward(self, x, use_act: bool = True):
        h = self.a(x)
        if use_act:
            h = torch.tanh(h)
        return self.b(h)


class OptionalMask(TwoLayer):
    def forward(self, x, mask=None):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h * mask
        return self.b(h)


class StringMode(TwoLayer):
    def forward(self, x, mode: str = "gelu"):
        h = self.a(x)
        h = F.gelu(h) if mode == "gelu" else torch.sigmoid(h)
        return self.b(h)


class OptionalTargets(TwoLayer):
    """nanoGPT's ``forward(idx, targets=None)``: no targets, no loss branch."""

    def forward(self, x, targets=None):
        logits = self.b(torch.relu(self.a(x)))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


X = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
CONSTANTS = {
    "float default": (FloatDefault, (X,)),
    "float given positionally": (FloatDefault, (X, 2.0)),
    "float given by keyword": (FloatDefault, {"x": X, "scale": 0.5}),
    "bool flag": (BoolFlag, (X,)),
    "bool flag off": (BoolFlag, (X, False)),
    "mask=None": (OptionalMask, (X,)),
    "string mode": (StringMode, (X,)),
    "string mode given": (StringMode, {"x": X, "mode": "sigmoid"}),
    "targets=None": (OptionalTargets, (X,)),
}


@pytest.mark.parametrize("case", sorted(CONSTANTS))
def test_non_tensor_arguments_are_constants(case):
    """Numbers, bools, None and strings (defaults or given) are constants of the graph:
    the branch the call takes is traced, and every layer gets statistics."""
    cls, inputs = CONSTANTS[case]
    audited(cls(), inputs, frontend="fx", layers=2)


def test_a_given_constant_changes_the_prediction():
    """scale=2.0 doubles what reaches the second layer: the constant is used, not dropped."""
    model = FloatDefault()
    one = gradaudit.audit(model, (X,))
    two = gradaudit.audit(model, (X, 2.0))
    assert two.layers[1].predicted.act_rms != one.layers[1].predicted.act_rms
    assert two.layers[0].predicted.grad_rms == pytest.approx(2 * one.layers[0].predicted.grad_rms, rel=1e-6)


# ----------------------------------------------------------------------------- sizes as values
class SizeValued(nn.Module):
    """pytorch-cifar's ``F.avg_pool2d(out, out.size(3))`` and ``out.view(out.size(0), -1)``,
    and ``F.layer_norm(x, self.weight.shape, ...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.weight = nn.Parameter(torch.ones(16))
        self.bias = nn.Parameter(torch.zeros(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        out = F.relu(self.conv(x))
        out = F.avg_pool2d(out, out.size(3))
        out = out.view(out.size(0), -1)
        out = F.layer_norm(out, self.weight.shape, self.weight, self.bias)
        return self.fc(out)


def test_size_valued_arguments_are_numbers():
    graph = fx.trace(SizeValued(), (torch.randn(4, 3, 8, 8),))
    pool = next(n for n in graph if n.op == "avg_pool2d")
    norm = next(n for n in graph if n.op == "layer_norm")
    view = next(n for n in graph if n.op == "view")
    assert pool.args[1] == 8 and tuple(norm.args[1]) == (16,) and view.args[1:] == (4, -1)
    audited(SizeValued(), (torch.randn(4, 3, 8, 8),), frontend="fx", layers=2)


# ----------------------------------------------------------------------------- nested inputs
class LSTMWithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x, hc):
        out, (h, c) = self.lstm(x, hc)
        return self.head(out)


def test_nested_tuple_input():
    """An LSTM's ``(h0, c0)`` reaches the shape pass and the probe as the tuple it is."""
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(4, 6, 16, generator=g), (torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)))
    report = audited(LSTMWithState(), inputs, frontend="fx", layers=2, probe=True)
    assert all(layer.measured is not None for layer in report.layers)


# ----------------------------------------------------------------------------- outputs
class DictOut(TwoLayer):
    def forward(self, x):
        h = self.a(x)
        return {"logits": self.b(torch.relu(h)), "hidden": h, "ids": h.argmax(-1), "extra": None}


def test_every_floating_output_is_in_L_and_integer_outputs_are_noted():
    """L = sum over every floating output (the dict's logits and hidden); the argmax is
    left out with a note."""
    report = audited(DictOut(), (X,), frontend="fx")
    assert any("int64" in n and "left out of L" in n for n in report.capture_notes), report.capture_notes


class ReturnsNone(TwoLayer):
    def forward(self, x):
        self.b(self.a(x))
        return None


class ReturnsIds(TwoLayer):
    def forward(self, x):
        return self.b(self.a(x)).argmax(-1)


@pytest.mark.parametrize("cls", [ReturnsNone, ReturnsIds])
def test_no_floating_output_is_incomplete_and_names_forward(cls):
    report = gradaudit.audit(cls(), (X,))
    assert report.verdict == "incomplete" and report.frontend == "fx"
    note = next(n for n in report.capture_notes if "returns" in n)
    assert re.search(rf"{cls.__name__}\.forward \(.*test_capture\.py:\d+\) returns", note), note


def test_inputs_that_do_not_fit_forward_end_the_chain():
    with pytest.raises(ModelCallError, match="do not fit FloatDefault.forward: too many positional arguments"):
        chain.capture(FloatDefault(), (X, 1.0, 2.0))


# ----------------------------------------------------------------------------- the chain
class IntOfSize(nn.Module):
    """``int(x.size(1))`` and ``torch.zeros(B, H)`` from traced sizes: torch.fx gives up."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        n = int(x.size(1))
        state = torch.zeros(x.size(0), 32)
        return self.b(torch.relu(self.a(x) + state) / n ** 0.5)


class DataDependent(TwoLayer):
    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 0.5
        return self.b(h)


def test_export_takes_what_fx_cannot_and_says_why():
    report = audited(IntOfSize(), (torch.randn(4, 16),), frontend="export", layers=2)
    (note,) = report.capture_notes
    assert note.startswith("fx failed: torch.fx could not trace the model at ")
    assert "test_capture.py:" in note


def test_hooks_take_a_data_dependent_branch_and_say_why_the_others_failed():
    report = audited(DataDependent(), (X,), frontend="hooks", layers=2)
    fx_note, export_note = report.capture_notes
    assert fx_note.startswith("fx failed:") and "test_capture.py:" in fx_note
    assert export_note.startswith("export failed:") and "test_capture.py:" in export_note


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


class SmallNet(nn.Module):
    """Modules, a shared layer called twice, functional ops, a residual, an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        seq = h.flatten(2).transpose(1, 2)
        seq = self.proj(0.5 * seq)
        out, _ = self.lstm(seq)
        return self.head(F.gelu(self.proj(out[..., 4:12].repeat(1, 1, 1))))


def test_every_frontend_builds_the_same_analysis():
    """fx, export and the hook capture give the same layers, module names, source lines
    and predicted statistics for a model all three can take."""
    model, inputs = SmallNet(), (torch.randn(2, 3, 6, 6),)
    results = {}
    for name in ("fx", "export", "hooks"):
        graph = chain.capture(model, inputs, frontends=(name,))
        assert graph.frontend == name
        analysis = propagate(graph)
        results[name] = [
            (n.module, n.op, str(n.location), analysis.stat(n.name).act_rms, analysis.stat(n.name).grad_rms)
            for n in analysis.layers()
        ]
    reference = results["fx"]
    assert len(reference) == 9
    for name in ("export", "hooks"):
        assert [r[:3] for r in results[name]] == [r[:3] for r in reference], name
        for got, want in zip(results[name], reference):
            assert got[3] == pytest.approx(want[3], rel=1e-6) and got[4] == pytest.approx(want[4], rel=1e-6), (name, got, want)
    assert "test_capture.py:" in reference[0][2]


def test_keyword_inputs():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 32)
            self.fc = nn.Linear(32, 50)

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
            return {"logits": self.fc(torch.tanh(h))}

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    report = audited(Tokens(), {"input_ids": ids, "attention_mask": torch.ones(2, 8)}, frontend="fx", layers=2)
    assert [x.get("name") for x in report.inputs] == ["input_ids", "attention_mask"]


class ThroughNumpy(nn.Module):
    """A module whose output is computed outside torch: the hook capture makes it one
    opaque node, estimated by local Monte Carlo."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 0.5

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * self.scale)


class WithOpaque(TwoLayer):
    def __init__(self) -> None:
        super().__init__()
        self.odd = ThroughNumpy()

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.mean() > -1:
            h = self.odd(h)
        return self.b(h)


def test_hook_capture_estimates_a_module_it_cannot_see_into():
    graph = hooks.capture(WithOpaque(), (X,))
    odd = next(n for n in graph if n.module == "odd")
    assert odd.op == "module" and odd.kind == "call_module"
    analysis = propagate(graph)
    assert "odd" in {e.module for e in analysis.estimates}


def test_every_capture_failing_still_probes(monkeypatch):
    """No capture works: --probe still measures every layer with module hooks, the
    prediction is unavailable and the verdict is incomplete, never healthy."""

    def fails(model, inputs):
        raise CaptureError("cannot capture this model (for the test)")

    monkeypatch.setattr(chain, "FRONTENDS", (("fx", fails), ("export", fails), ("hooks", fails)))
    model = TwoLayer()
    model.forward = lambda x: model.b(torch.relu(model.a(x)))
    report = gradaudit.audit(model, (X,), probe=True)
    assert report.verdict == "incomplete" and not report.complete
    assert report.frontend == "none"
    assert [n.split(":")[0] for n in report.capture_notes] == ["fx failed", "export failed", "hooks failed"]
    measured = measure_modules(model, (X,), draws=2)
    assert [layer.module for layer in report.layers] == ["a", "b"]
    for layer in report.layers:
        assert math.isnan(layer.predicted.act_rms)
        m = measured[(layer.module, 0)]
        assert layer.measured.act_rms == pytest.approx(m[0], rel=0.5) and layer.measured.grad_rms == pytest.approx(m[1], rel=0.5)
    with pytest.raises(CaptureError, match="no capture of the model worked"):
        gradaudit.audit(model, (X,))


def test_fx_path_does_not_import_dynamo():
    """The fallbacks cost seconds of import (torch._dynamo); a model fx takes never pays it."""
    code = (
        "import sys, torch, gradaudit\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "r = gradaudit.audit(m, torch.randn(4, 8))\n"
        "print(r.frontend, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["fx", "False"], out.stderr[-2000:]


def test_export_keeps_names_and_lines_of_standard_layers():
    graph = export.capture(SmallNet(), (torch.randn(2, 3, 6, 6),))
    lstm = next(n for n in graph if n.op == "lstm")
    assert lstm.kind == "call_module" and lstm.module == "lstm" and lstm.module_type == "LSTM"
    assert lstm.location is not None and lstm.location.path.endswith("test_capture.py")
    proj_calls = [n for n in graph if n.module == "proj" and n.kind == "call_module"]
    assert [n.name for n in proj_calls] == ["proj", "proj_1"]


@pytest.mark.parametrize("inferred", [True, False])
def test_input_hint_only_where_inputs_are_the_cause(inferred, write, cli):
    """Inferred inputs that the forward rejects get the --input-shape hint; a forward that
    fails on inputs the user gave gets no such hint."""
    given = "" if inferred else "example_inputs = (torch.randn(2, 4),)\n"
    write(
        "net.py",
        "import torch\nimport torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.view(3, -1))\n" + given,
    )
    result = cli("check", "net.py", cwd=write("x", "").parent)
    assert result.exit_code == 2
    assert ("pass --input-shape" in result.output) is inferred, result.output


def _drop_path_as_timm_writes_it(x, drop_prob: float, training: bool):
    """timm.layers.drop_path, which torch.fx traces into (it is not wrapped)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    random_tensor.div_(keep)
    return x * random_tensor


class DropPathBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        for fc in self.fcs:
            x = x + _drop_path_as_timm_writes_it(torch.tanh(fc(x)), 0.3, self.training)
        return x


def test_uninitialised_memory_is_not_read(monkeypatch):
    """``x.new_empty(shape).bernoulli_(keep)``: the value of ``new_empty`` is whatever the
    allocator returns (NaN on some machines). The capture makes it a constant of zeros and
    spells the whole in-place DropPath as the stochastic depth it is, so an allocator
    that returns NaN changes nothing."""
    torch.manual_seed(0)
    model, inputs = DropPathBlocks(), (torch.randn(16, 32),)
    graph = chain.capture(model, inputs)
    assert [n.op for n in graph].count("stochastic_depth") == 4
    assert not {"new_empty", "bernoulli", "div"} & {n.op for n in graph}
    clean = gradaudit.audit(model, inputs)
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: real_new_empty(self, *a, **k).fill_(float("nan")))
    report = gradaudit.audit(model, inputs)
    assert report.verdict != "incomplete" and not report.coverage.gaps
    assert [(l.node, l.predicted.act_rms, l.predicted.grad_rms) for l in report.layers] == [
        (l.node, l.predicted.act_rms, l.predicted.grad_rms) for l in clean.layers
    ]
    monkeypatch.undo()
    measured = measure_modules(model, inputs, draws=32)
    for layer in report.layers:
        act, grad = measured[(layer.module, 0)]
        assert abs(math.log10(layer.predicted.act_rms / act)) < math.log10(2), (layer.module, layer.predicted, act)
        assert abs(math.log10(layer.predicted.grad_rms / grad)) < math.log10(2), (layer.module, layer.predicted, grad)
