"""The HTML report: self-contained, escaped, in the documented order, with the chart
data taken from the report and drawn without a plotting library."""

from __future__ import annotations

import markupsafe
import math
import re
from pathlib import Path

import pytest

from gradaudit.propagation.depth import summarize
from gradaudit.report import html as html_report
from gradaudit.report.charts import depth_chart, series
from gradaudit.catalog import difference
from gradaudit.report.model import AuditReport, LayerRecord, Moments
from gradaudit.rules.base import Finding

ROOT = Path(__file__).resolve().parent.parent
GOLD = Path(__file__).parent / "gold"
EVIL = "<img src=x onerror=alert(1)>"


def _audit(path: Path):
    import gradaudit
    from gradaudit.loading import load_target

    loaded = load_target(str(path))
    return gradaudit.audit(loaded.model, loaded.inputs, target=str(path), input_source=loaded.input_source)


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    report = _audit(GOLD / "evil_names.py")
    return report, html_report.render(report)


@pytest.fixture(scope="module")
def deep_sigmoid():
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        report = _audit(Path("examples/deep_sigmoid.py"))
        return report, html_report.render(report)
    finally:
        os.chdir(cwd)


def _esc(text: str) -> str:
    return str(markupsafe.escape(text))


def _report(layers, findings=(), **kw) -> AuditReport:
    grads = [l.predicted.grad_rms for l in layers if l.depth]
    return AuditReport(target="net.py", frontend="fx", input_source="given", inputs=[], findings=list(findings),
                       layers=layers, depth=summarize(grads), **kw)


def _layer(i, act, grad, depth=True, measured=None):
    return LayerRecord(node=f"n{i}", module=f"l{i}", op="linear" if depth else "relu", module_type=None,
                       predicted=Moments(act, grad), measured=measured, depth=i + 1 if depth else None)


def test_injected_module_name_is_escaped(evil):
    report, page = evil
    assert any(l.module == EVIL for l in report.layers)
    assert str(markupsafe.escape(EVIL)) in page
    assert "<img" not in page.lower()


def test_injected_module_name_reaches_the_findings(evil):
    report, page = evil
    mentioned = [f for f in report.findings if EVIL in (f.message + (f.fix or ""))]
    assert mentioned
    for f in mentioned:
        assert _esc(f.message) in page


@pytest.mark.parametrize(
    "pattern",
    [r"<script", r"<link", r"@import", r"@font-face", r"\bsrc\s*=", r"url\(\s*['\"]?(?!#)", r"<iframe", r"<object",
     r"<embed", r"href\s*=\s*['\"](?!#)"],
)
def test_self_contained(deep_sigmoid, pattern):
    assert not re.search(pattern, deep_sigmoid[1], flags=re.I)


def test_only_xml_namespaces_name_an_address(deep_sigmoid):
    assert set(re.findall(r"https?://[^\s\"'<>)]+", deep_sigmoid[1])) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_sections_in_order(deep_sigmoid):
    page = deep_sigmoid[1]
    ids = ["verdict", "findings", "depth", "gradcheck", "estimated", "layers", "environment"]
    pos = [page.index(f'id="{i}"') for i in ids]
    assert pos == sorted(pos)


def test_dark_mode(deep_sigmoid):
    assert "@media (prefers-color-scheme: dark)" in deep_sigmoid[1]


def test_every_finding_shows_message_and_fix_as_code(deep_sigmoid):
    report, page = deep_sigmoid
    assert report.findings
    for f in report.findings:
        assert _esc(f.message) in page
        if f.fix:
            assert f'<pre class="fix"><code>{_esc(f.fix)}</code></pre>' in page


def test_source_line_of_the_finding(deep_sigmoid):
    report, page = deep_sigmoid
    (f,) = [f for f in report.findings if f.rule == "GA101"]
    src = (ROOT / f.location["path"]).read_text().splitlines()[f.location["line"] - 1].strip()
    assert src == "layer = nn.Linear(WIDTH, WIDTH)"
    assert f'{f.location["line"]} │ </span>{_esc(src)}</pre>' in page


def test_verdict_and_sentence_first(deep_sigmoid):
    report, page = deep_sigmoid
    verdict = page[page.index('id="verdict"'):page.index('id="findings"')]
    assert report.verdict == "vanishing" and ">VANISHING</span>" in verdict
    (ga101,) = [f for f in report.findings if f.rule == "GA101"]
    assert ga101.message.split("; ")[0] in verdict


def test_environment_rows(deep_sigmoid):
    page = deep_sigmoid[1]
    env = page[page.index('id="environment"'):]
    for key in ("gradaudit", "torch", "device", "dtype", "frontend", "input source", "time taken"):
        assert f"<th>{key}</th>" in env


def test_render_is_deterministic(deep_sigmoid):
    report, page = deep_sigmoid
    assert html_report.render(report) == page


def _svg(page: str) -> str:
    return page[page.index("<svg"):page.index("</svg>") + len("</svg>")]


def test_series_bands_are_1e3_around_the_last_weight_layer():
    layers = [_layer(0, 1.0, 1e-5), _layer(1, 2.0, 1e-2), _layer(2, 3.0, 4.0), _layer(3, 3.0, 9.0, depth=False)]
    data = series(_report(layers))
    assert data["reference"] == 4.0  # the last weight layer, not the layer without a depth after it
    assert data["vanishing_below"] == pytest.approx(4e-3) and data["exploding_above"] == pytest.approx(4e3)
    assert data["x"] == [1, 2, 3]  # weight layers only, as the text counts them
    assert data["grad"] == [1e-5, 1e-2, 4.0] and data["act"] == [1.0, 2.0, 3.0]


def test_series_plots_the_layer_gradient_of_the_headline():
    """Where a layer's weight is shared by P positions, the chart shows sqrt(P) x grad RMS,
    the quantity of the headline and GA101, not the per-element RMS."""
    conv = LayerRecord(node="c", module="conv", op="conv", module_type=None, depth=1,
                       predicted=Moments(1.0, 0.01, 0.32), measured=Moments(1.0, 0.02, 0.64))
    data = series(_report([conv, _layer(1, 1.0, 1.0)]))
    assert data["grad"] == [0.32, 1.0] and data["grad_measured"][0] == 0.64


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_series_drops_values_a_log_axis_cannot_show(bad):
    data = series(_report([_layer(0, 1.0, bad), _layer(1, 1.0, 1.0)]))
    assert math.isnan(data["grad"][0]) and data["grad"][1] == 1.0


def test_chart_points_follow_the_data_on_a_log_scale():
    """Each plotted gradient point lies where its value falls between two decade ticks."""
    values = [1e-5, 3e-4, 1e-2, 0.5, 1.0]
    chart = depth_chart(_report([_layer(i, 1.0, g) for i, g in enumerate(values)]))
    (line,) = [ln for ln in chart["lines"] if ln["key"] == "grad"]
    (run,) = line["runs"]
    ys = [p[1] for p in run]
    per_decade = (ys[0] - ys[2]) / 3.0  # 1e-5 -> 1e-2
    for v, y in zip(values, ys):
        assert y == pytest.approx(ys[0] - per_decade * (math.log10(v) + 5), abs=0.15)
    xs = [p[0] for p in run]
    steps = [b - a for a, b in zip(xs, xs[1:])]
    assert min(steps) > 0 and max(steps) - min(steps) <= 0.2  # evenly spaced, up to the 0.1 of the coordinates
    ticks = {t["label"]: t["y"] for t in chart["y_ticks"]}
    assert ticks["10\u207b\u2075"] == pytest.approx(ys[0], abs=0.15) and ticks["1"] == pytest.approx(ys[4], abs=0.15)


def test_a_nan_breaks_the_line():
    chart = depth_chart(_report([_layer(0, 1.0, 0.1), _layer(1, 1.0, float("nan")), _layer(2, 1.0, 0.5),
                                 _layer(3, 1.0, 1.0)]))
    (line,) = [ln for ln in chart["lines"] if ln["key"] == "grad"]
    assert [len(r) for r in line["runs"]] == [1, 2]


def test_measured_series_drawn_only_when_probed():
    plain = _svg(html_report.render(_report([_layer(0, 1.0, 0.1), _layer(1, 1.0, 1.0)])))
    probed = _svg(html_report.render(_report([_layer(0, 1.0, 0.1, measured=Moments(1.1, 0.2)),
                                              _layer(1, 1.0, 1.0)])))
    assert "layer gradient (measured)" not in plain
    assert "layer gradient (measured)" in probed and "activation RMS (measured)" in probed
    assert probed.count('<path d="M') == plain.count('<path d="M') + 2 + 2  # one mark per measured value


def test_chart_svg_is_inline_ready():
    svg = _svg(html_report.render(_report([_layer(0, 1.0, 0.1), _layer(1, 1.0, 1.0)])))
    assert svg.startswith('<svg class="chart" role="img"') and "<?xml" not in svg and "<metadata" not in svg
    assert "var(--chart-fg)" in svg  # follows the page's light/dark colours
    assert " id=" not in svg and "href" not in svg


def test_no_layers_no_chart():
    page = html_report.render(_report([]))
    assert "<svg" not in page and "No layer statistics to chart." in page


def test_chart_and_text_count_the_same_weight_layers(monkeypatch):
    """A Post-LN encoder lists LayerNorms and attention beside its weight layers: the chart's
    x axis runs over the weight layers the text counts, no further."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "rules"))
    from rulemodels import Encoder

    import gradaudit

    report = gradaudit.audit(Encoder(6, norm_first=False), (torch.randn(2, 10, 32),))
    n = report.depth.n_layers
    assert n == sum(1 for layer in report.layers if layer.depth)  # what the text's "#" column counts
    assert len(report.layers) > n  # the layer table lists more than the weight layers
    page = html_report.render(report)
    svg = _svg(page)
    ticks = re.findall(r'<text x="[\d.]+" y="[\d.]+">(\d+)</text>', svg[svg.index('class="x-ticks"'):])
    assert [int(t) for t in ticks] == list(range(1, n + 1))
    assert svg.count("<title>weight layer ") == n
    assert f"over {n} weight layers" in page


@pytest.mark.parametrize(
    "slope,n,caption",
    [
        (-0.15, 31, "Fitted trend: the gradient changes 10\u00d7 every 6.67 weight layers."),
        (0.0075, 20, "Fitted trend: the gradient changes less than 10\u00d7 across the 20 weight layers."),
        (0.0, 20, "Fitted trend: the gradient changes less than 10\u00d7 across the 20 weight layers."),
        (float("nan"), 20, ""),
        (-0.5, 1, ""),
    ],
)
def test_trend_caption_never_extrapolates_beyond_the_model(slope, n, caption):
    from gradaudit.propagation.depth import DepthSummary

    assert html_report.trend(DepthSummary(n, 1.0, slope, 1.0, None, None)) == caption


def test_counts_use_the_severities_of_the_other_reports():
    info = Finding(rule="GA606", name="gradient-norm-scale", category="other", severity="info", message="m")
    page = html_report.render(_report([_layer(0, 1.0, 0.5), _layer(1, 1.0, 1.0)], findings=[info]))
    assert "0 errors, 0 warnings, 1 info" in page and "<h3>Info (1)</h3>" in page
    assert "note" not in page[page.index('id="verdict"'):page.index('id="depth"')].lower()


def test_gradcheck_table_escaped_with_the_worst_entry_spelled_out():
    rows = [{"target": "<script>alert(1)</script>", "kind": "autograd.Function", "max_rel_error": 1.5e-9,
             "grade": "correct", "worst": []},
            {"target": "Swish", "kind": "module", "max_rel_error": 0.25, "grade": "wrong", "seed": 7,
             "worst": [{"tensor": "input[0]", "index": [1, 3], "autograd": 0.5, "numeric": 0.3, "rel_error": 0.25}],
             "kinks": [{"index": [0]}], "location": {"path": "net.py", "line": 9}}]
    page = html_report.render(_report([_layer(0, 1.0, 1.0)], gradcheck=rows))
    table = page[page.index('id="gradcheck"'):page.index('id="estimated"')]
    assert "<script>" not in table and "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    heads = re.findall(r"<th>([^<]*)</th>", table)
    assert heads == ["target", "kind", "grade", "max rel. error", "worst entry", "location", "seed"]
    body = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in body]
    assert cells[0] == ["&lt;script&gt;alert(1)&lt;/script&gt;", "autograd.Function", "correct", "1.5e-09", "", "", ""]
    assert cells[1] == ["Swish", "module", "wrong", "0.25", "input[0][1, 3]: autograd 0.5 vs numeric 0.3", "net.py:9", "7"]


def test_suppressed_findings_listed():
    f = Finding(rule="GA101", name="vanishing-gradients", category="vanishing", severity="error", message="m <b>",
                module="enc.fc")
    item = f.to_json() | {"suppressed_by": "noqa", "suppression": "# gradaudit: noqa at net.py:3"}
    page = html_report.render(_report([_layer(0, 1.0, 1.0)], suppressed=[item]))
    assert "1 suppressed finding" in page and "m &lt;b&gt;" in page and "enc.fc" in page


def test_healthy_headline():
    from gradaudit.report.common import headline

    layers = [_layer(0, 1.0, 0.5), _layer(1, 1.0, 1.0)]
    rep = _report(layers)
    head = headline(rep)
    assert head.label == "HEALTHY" and head.severity is None
    assert head.sentence.startswith("the predicted weight-gradient scale stays within 0.3 decades across 2 weight layers")
    page = html_report.render(rep)
    assert ">HEALTHY</span>" in page and head.sentence in page


def test_cli_writes_the_same_page(deep_sigmoid, tmp_path):
    import subprocess
    import sys

    from gradaudit.catalog import scrub

    out = tmp_path / "audit.html"
    proc = subprocess.run([sys.executable, "-m", "gradaudit", "check", "examples/deep_sigmoid.py", "--format", "html",
                           "-o", str(out), "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    got = scrub(out.read_text(encoding="utf-8"), "html", root=str(ROOT))
    assert difference(got, scrub(deep_sigmoid[1], "html", root=str(ROOT))) is None


def test_probe_summary():
    probe = {"draws": 2, "device": "cpu", "dtype": "fp32", "total_grad_norm": 16.0, "grad_norms": [23.3, 8.64],
             "agreement": [{"node": "fc"}], "agreement_summary": {"layers": 4, "fraction_act_within_2x": 0.75,
                                                                  "fraction_grad_within_2x": 1.0},
             "nonfinite": {"phase": "backward", "op": "log", "module": "<b>head</b>", "node": "log_1", "value": "nan",
                           "cause": "nan", "location": {"path": "net.py", "line": 7}},
             "notes": ["2 draw(s) on CPU"], "inputs": [{"input": "x", "measured_rms": 1.33, "predicted_rms": 1.0}]}
    page = html_report.render(_report([_layer(0, 1.0, 1.0, measured=Moments(1.0, 1.0))], probe=probe))
    rows = dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", page[page.index("<h3>Probe</h3>"):]))
    assert rows["prediction within 2x of measurement"] == "activations 75%, gradients 100% of 4 layers"
    assert rows["input x"] == "measured RMS 1.33, prediction assumed 1"
    assert rows["first non-finite value"] == "nan in the backward pass of log &#39;&lt;b&gt;head&lt;/b&gt;&#39; at net.py:7 (nan)"
    assert rows["gradient norm per draw"] == "[23.3, 8.64]" and rows["draws"] == "2"
