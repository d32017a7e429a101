"""Never a false all-clear: an audit whose prediction does not cover the model says so.

Each case below used to be reported HEALTHY (exit 0). The oracle is structural: the
model's output holds no floating tensor, the model has no parameters, the output is
detached from them, an op cannot be evaluated, a prediction is not finite.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import gradaudit
import gradaudit.api
from gradaudit.report.model import INCOMPLETE_EXIT
from shown import depth_change, shows

pytestmark = pytest.mark.oldest


class NoneOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        self.fc(x)
        return None


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).detach() * 2


@torch.fx.wrap
def only_on_traced_inputs(x):
    """An op that runs for the model's own call and the shape pass, and nowhere else."""
    if getattr(x, "_gradaudit_ok", False) or type(x).__name__ == "FakeTensor":
        return x * 2
    raise RuntimeError("refuses sampled inputs")


class Inestimable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(only_on_traced_inputs(self.fc1(x)))


def _audit(model, x, **kw):
    torch.manual_seed(0)
    return gradaudit.audit(model, (x,), **kw)


@pytest.mark.parametrize(
    "build,x,cause",
    [
        (NoneOutput, torch.randn(2, 16), "no floating tensor"),
        (lambda: nn.Sequential(nn.ReLU(), nn.Tanh()), torch.randn(2, 8), "no parameters"),
        (Detached, torch.randn(2, 8), "reaches no parameter"),
        (Inestimable, torch.randn(2, 8), "could not be run alone"),
    ],
)
def test_uncovered_model_is_incomplete_never_healthy(build, x, cause):
    report = _audit(build(), x)
    assert report.verdict == "incomplete" and not report.complete and not report.ok()
    assert report.exit_code() == INCOMPLETE_EXIT
    assert any(cause in g.reason for g in report.coverage.gaps), [g.reason for g in report.coverage.gaps]
    ga001 = [f for f in report.findings if f.rule == "GA001"]
    assert ga001 and any(cause in f.message for f in ga001)
    summary = report.to_json()["summary"]
    assert summary["verdict"] == "incomplete" and summary["coverage"]["complete"] is False


def test_inestimable_op_names_the_node_and_the_layers_it_cuts_off():
    report = _audit(Inestimable(), torch.randn(2, 8))
    (gap,) = report.coverage.gaps
    assert gap.node == "only_on_traced_inputs" and gap.layers == ["fc2"]
    assert gap.location is not None and gap.location.path.endswith("test_coverage.py")
    assert report.coverage.layers == 2 and report.coverage.with_statistics == 1
    assert [e["ok"] for e in report.estimated_ops] == [False]


def _poisoned_propagate(node_name: str):
    real = gradaudit.api.propagate

    def propagate(graph, stats=None):
        analysis = real(graph, stats)
        if node_name in analysis.stats:
            analysis.stats[node_name][0].m2 = math.nan
        return analysis

    return propagate


@pytest.mark.parametrize("probe", [False, True])
def test_a_non_finite_prediction_never_passes_silently(monkeypatch, probe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    clean = gradaudit.audit(model, (torch.randn(4, 8),), probe=probe)
    assert clean.verdict == "healthy" and clean.complete
    monkeypatch.setattr(gradaudit.api, "propagate", _poisoned_propagate("_2"))
    report = gradaudit.audit(model, (torch.randn(4, 8),), probe=probe)
    assert report.verdict == "incomplete" and report.exit_code() == INCOMPLETE_EXIT
    (gap,) = report.coverage.gaps
    assert gap.node == "_2" and "not finite" in gap.reason and gap.layers == ["2"]
    if probe:  # the comparison with the measurement lists the layer instead of skipping it
        (disagree,) = [f for f in report.findings if f.rule == "GA607"]
        assert "'2' (act: prediction not finite" in disagree.message


def test_incomplete_exit_status_on_the_command_line(cli, write, tmp_path):
    write("net.py", "import torch, torch.nn as nn\n"
                    "class M(nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.fc = nn.Linear(4, 4)\n"
                    "    def forward(self, x):\n"
                    "        return self.fc(x).detach()\n"
                    "model = M()\n")
    result = cli("check", "net.py", cwd=tmp_path)
    assert result.exit_code == INCOMPLETE_EXIT
    assert result.stdout.startswith("INCOMPLETE  ")
    assert cli("check", "net.py", "--exit-zero", cwd=tmp_path).exit_code == INCOMPLETE_EXIT
    out = cli("check", "net.py", "--format", "json", cwd=tmp_path)
    assert json.loads(out.stdout)["summary"]["verdict"] == "incomplete"


def test_headline_rule_and_table_quote_one_figure(cli, tmp_path):
    """The deep sigmoid example: the headline and GA101 quote the figure that the table's
    layer-grad column gives by GA101's documented definition."""
    import pathlib

    example = pathlib.Path(__file__).parent.parent / "examples" / "deep_sigmoid.py"
    report = json.loads(cli("check", str(example), "--format", "json", "-q").stdout)
    grads = [layer["predicted"]["layer_grad"] for layer in report["layers"] if layer["depth"] is not None]
    (ga101,) = [f for f in report["findings"] if f["rule"] == "GA101"]
    assert ga101["data"]["decades"] == pytest.approx(depth_change(grads), abs=1e-4)  # the table's numbers
    assert ga101["data"]["ratio"] == pytest.approx(10 ** depth_change(grads), rel=1e-3)
    assert shows(ga101["message"], "falls {}x from the last weight layer", 1 / ga101["data"]["ratio"])
    text = cli("check", str(example)).stdout
    assert text.splitlines()[0] == "VANISHING  " + ga101["message"].split("; ")[0]


def test_a_model_that_exits_0_has_no_error_headline():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.Tanh())])  # default init
    report = gradaudit.audit(model, (torch.randn(8, 64),))
    assert report.exit_code() == 0
    from gradaudit.report.common import headline

    head = headline(report)
    assert head.severity != "error" and head.label in ("HEALTHY", "WARNING")
    if head.label == "WARNING":
        assert " risk: " in head.sentence


class FoldedRead(nn.Module):
    """An op without a handler reads a parameter through a transpose, which torch.export
    folds into a constant computed from the parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.cdist(x, self.w.t().contiguous().t()))


def test_an_op_reading_a_parameter_through_a_folded_constant_must_have_statistics():
    """The op reading ``w`` through the folded constant counts among the layers the
    statistics must cover: without statistics there, the audit is incomplete."""
    from gradaudit.api import Settings, analyse, capture
    from gradaudit.propagation import coverage

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    graph = capture(FoldedRead(), (x,), frontends=("export",))
    analysis = analyse(graph, (x,), None, Settings())
    readers = [n for n in coverage.parameter_layers(analysis) if n.op == "cdist"]
    assert len(readers) == 1 and coverage.check(analysis).complete
    analysis.stats[readers[0].name] = [None]
    assert not coverage.check(analysis).complete
