"""``gradaudit compare``: the Xavier and He versions of the 30-layer ReLU MLP (the
vanishing finding gone, the per-layer gradient change equal to the two audits' own
numbers), JSON files and targets as sides, the exit status at --fail-on, the matching of
findings, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradaudit.compare import match

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
XAVIER = "examples/relu_xavier_30.py"
HE = "examples/relu_he_30.py"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The two examples' JSON reports, written by ``gradaudit check``."""
    from click.testing import CliRunner

    from gradaudit.cli import main

    folder = tmp_path_factory.mktemp("cmp")
    out = {}
    runner = CliRunner()
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for name, target in (("xavier", XAVIER), ("he", HE)):
            path = folder / f"{name}.json"
            res = runner.invoke(main, ["check", target, "--format", "json", "-o", str(path), "-q"])
            assert res.exit_code in (0, 1), res.output
            out[name] = path
    finally:
        os.chdir(cwd)
    return out


def test_xavier_to_he_vanishing_gone_and_per_layer_change(cli, reports):
    res = cli("compare", XAVIER, HE, "--format", "json", cwd=ROOT)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["verdict"] == {"base": "vanishing", "new": "normalization"}
    gone = {f["rule"] for f in data["findings"]["gone"]}
    assert "GA101" in gone and not data["findings"]["added"]
    xavier = json.loads(reports["xavier"].read_text())
    he = json.loads(reports["he"].read_text())
    assert len(data["layers"]) == len(xavier["layers"]) == len(he["layers"]) == 30
    for row, x, h in zip(data["layers"], xavier["layers"], he["layers"]):
        assert row["layer"] == x["module"] == h["module"]
        assert row["base_grad_rms"] == x["predicted"]["grad_rms"] and row["new_grad_rms"] == h["predicted"]["grad_rms"]
        assert row["grad_ratio"] == pytest.approx(h["predicted"]["grad_rms"] / x["predicted"]["grad_rms"], rel=1e-9)
    # He keeps the first layer's gradient within ~1 decade of the last; Xavier loses ~5
    assert data["layers"][0]["grad_ratio"] > 1e3 and data["layers"][-1]["grad_ratio"] == pytest.approx(1.0)


def test_text_and_markdown(cli, reports):
    from markdown_it import MarkdownIt

    text = cli("compare", reports["xavier"], reports["he"]).stdout
    assert text.startswith("verdict: VANISHING -> NORMALIZATION")
    assert "findings gone (3)" in text and "GA101 vanishing-gradients" in text and "findings added (0)" in text
    md = cli("compare", reports["xavier"], reports["he"], "--format", "markdown").stdout
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert html.count("<table>") == 1 and html.count("<tr>") == 1 + 11
    assert "GA101 vanishing-gradients" in html


def test_worse_new_side_exits_1(cli, reports):
    for fail_on in ("error", "warning", "info"):
        res = cli("compare", reports["he"], reports["xavier"], "--fail-on", fail_on)
        assert res.exit_code == 1 and "findings added (3)" in res.stdout


def test_only_warnings_added_pass_an_error_gate(cli, reports, tmp_path):
    base = json.loads(reports["xavier"].read_text())
    new = json.loads(reports["xavier"].read_text())
    extra = dict(new["findings"][-1], rule="GA999", severity="warning")
    new["findings"].append(extra)
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "base.json").write_text(json.dumps(base))
    assert cli("compare", tmp_path / "base.json", tmp_path / "new.json").exit_code == 0
    assert cli("compare", tmp_path / "base.json", tmp_path / "new.json", "--fail-on", "warning").exit_code == 1


def _f(rule, module, severity="warning"):
    return {"rule": rule, "module": module, "node": None, "severity": severity}


@pytest.mark.parametrize(
    "base,new,kept,added,gone",
    [
        ([_f("GA101", "24")], [_f("GA101", "24")], 1, 0, 0),
        ([_f("GA101", "24")], [_f("GA101", "26")], 1, 0, 0),  # the crossing layer moved
        ([_f("GA101", "24")], [_f("GA102", "24")], 0, 1, 1),
        ([_f("GA301", "a")], [_f("GA301", "a"), _f("GA301", "b")], 1, 1, 0),
        ([_f("GA301", "a"), _f("GA301", "b")], [_f("GA301", "b")], 1, 0, 1),
        ([], [_f("GA1", None)], 0, 1, 0),
    ],
)
def test_matching(base, new, kept, added, gone):
    k, a, g = match(base, new)
    assert (len(k), len(a), len(g)) == (kept, added, gone)


def test_exact_key_wins_over_order():
    base = [_f("GA301", "a"), _f("GA301", "b")]
    kept, added, gone = match(base, [_f("GA301", "b"), _f("GA301", "c")])
    assert [(b["module"], n["module"]) for b, n in kept] == [("b", "b"), ("a", "c")] and not added and not gone


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "not a gradaudit JSON report"), ('{"a": 1}', "format_version 1"),
     ('{"format_version": 1, "reports": [{}, {}]}', "holds 2 reports")],
)
def test_bad_report_file_is_one_line_exit_2(cli, tmp_path, reports, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = cli("compare", bad, reports["he"])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_missing_file_is_exit_2(cli, tmp_path, reports):
    res = cli("compare", tmp_path / "nope.json", reports["he"])
    assert res.exit_code == 2 and "no such file" in res.stderr
