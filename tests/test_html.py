"""The HTML report: self-contained, escaped, in the documented order, with the chart
data taken from the report."""

from __future__ import annotations

import markupsafe
import math
import re
from pathlib import Path

import pytest

from gradaudit.propagation.depth import summarize
from gradaudit.report import html as html_report
from gradaudit.report.charts import depth_chart, series
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


def test_series_bands_are_1e3_around_the_last_weight_layer():
    layers = [_layer(0, 1.0, 1e-5), _layer(1, 2.0, 1e-2), _layer(2, 3.0, 4.0), _layer(3, 3.0, 9.0, depth=False)]
    data = series(_report(layers))
    assert data["reference"] == 4.0  # the last layer with a depth, not the activation after it
    assert data["vanishing_below"] == pytest.approx(4e-3) and data["exploding_above"] == pytest.approx(4e3)
    assert data["grad"] == [1e-5, 1e-2, 4.0, 9.0] and data["act"] == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_series_drops_values_a_log_axis_cannot_show(bad):
    data = series(_report([_layer(0, 1.0, bad), _layer(1, 1.0, 1.0)]))
    assert math.isnan(data["grad"][0]) and data["grad"][1] == 1.0


def test_measured_series_drawn_only_when_probed():
    plain = depth_chart(_report([_layer(0, 1.0, 0.1), _layer(1, 1.0, 1.0)]))
    probed = depth_chart(_report([_layer(0, 1.0, 0.1, measured=Moments(1.1, 0.2)), _layer(1, 1.0, 1.0)]))
    assert "gradient RMS (measured)" not in plain
    assert "gradient RMS (measured)" in probed and "activation RMS (measured)" in probed


def test_chart_svg_is_inline_ready():
    svg = depth_chart(_report([_layer(0, 1.0, 0.1), _layer(1, 1.0, 1.0)]))
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg and "<metadata" not in svg
    assert "var(--chart-fg)" in svg  # follows the page's light/dark colours


def test_no_layers_no_chart():
    page = html_report.render(_report([]))
    assert "<svg" not in page and "No layer statistics to chart." in page


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
    assert scrub(out.read_text(encoding="utf-8"), "html", root=str(ROOT)) == scrub(deep_sigmoid[1], "html", root=str(ROOT))


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
