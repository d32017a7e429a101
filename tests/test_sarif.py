"""SARIF 2.1.0 output: validates against the official schema (vendored in
tests/schemas/), carries the user's file and line, rule metadata from the docstrings,
stable fingerprints, and GitHub code scanning's limits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from gradaudit.propagation.depth import summarize
from gradaudit.report import sarif
from gradaudit.report.model import AuditReport, LayerRecord, Moments
from gradaudit.rules.base import Finding, all_rules

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "sarif-schema-2.1.0.json").read_text())
# This copy of the schema keeps the log's own schema under definitions/Root (its top
# level constrains nothing): validate against that definition.
VALIDATOR = jsonschema.Draft7Validator({**SCHEMA, "$ref": "#/definitions/Root"})
RULES = all_rules()


def _finding(rule="GA101", severity="error", module="fc", path="net.py", line=3, **kw) -> Finding:
    cls = RULES[rule]
    loc = {"path": path, "line": line} if path else None
    return Finding(rule=rule, name=cls.name, category=cls.category, severity=severity, message=kw.pop("message", "m"),
                   fix=kw.pop("fix", "nn.init.kaiming_normal_(model.fc.weight)"), node="n0", module=module, location=loc, **kw)


def _report(findings, target="net.py", **kw) -> AuditReport:
    grads = [1e-4, 1e-2, 1.0]
    layers = [LayerRecord(node=f"n{i}", module=f"l{i}", op="linear", module_type="Linear",
                          predicted=Moments(1.0, g), depth=i + 1) for i, g in enumerate(grads)]
    return AuditReport(target=target, frontend="fx", input_source="given", inputs=[], findings=findings,
                       layers=layers, depth=summarize(grads), **kw)


def _errors(log: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(log)]


def _line_of(path: Path, text: str) -> int:
    """The 1-based line of ``text`` in a file: the independent oracle for locations."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), start=1) if text in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def deep_sigmoid_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("sarif") / "deep_sigmoid.sarif"
    proc = subprocess.run(
        [sys.executable, "-m", "gradaudit", "check", "examples/deep_sigmoid.py", "--format", "sarif", "-o", str(out), "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    return json.loads(out.read_text())


def test_deep_sigmoid_validates(deep_sigmoid_log):
    assert _errors(deep_sigmoid_log) == []


@pytest.mark.parametrize(
    "spoil",
    [
        lambda log: log.update(version="2.0.0"),
        lambda log: log["runs"][0].update(bogus=1),
        lambda log: log["runs"][0]["results"][0].update(level="fatal"),
        lambda log: log["runs"][0]["artifacts"].append({"uri": "a.py"}),
        lambda log: log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"].update(startLine=0),
        lambda log: log["runs"][0]["tool"]["driver"].pop("name"),
    ],
)
def test_the_schema_check_bites(deep_sigmoid_log, spoil):
    log = json.loads(json.dumps(deep_sigmoid_log))
    spoil(log)
    assert _errors(log) != []


def test_deep_sigmoid_carries_user_file_and_line(deep_sigmoid_log):
    (res,) = [r for r in deep_sigmoid_log["runs"][0]["results"] if r["ruleId"] == "GA101"]
    phys = res["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"] == {"uri": "examples/deep_sigmoid.py", "uriBaseId": "%SRCROOT%", "index": 0}
    # the vanishing layer is one of the Linear(32, 32) built in the loop
    assert phys["region"]["startLine"] == _line_of(ROOT / "examples/deep_sigmoid.py", "layer = nn.Linear(WIDTH, WIDTH)")
    assert res["level"] == "error"
    base = deep_sigmoid_log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"]
    assert base == ROOT.as_uri() + "/"


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_metadata_from_docstring(code):
    log = json.loads(sarif.render(_report([])))
    rules = {r["id"]: r for r in log["runs"][0]["tool"]["driver"]["rules"]}
    cls = RULES[code]
    desc = rules[code]
    assert desc["fullDescription"]["text"] == " ".join(cls.doc_sections()["What it does"].split())
    assert desc["shortDescription"]["text"] == cls.summary()
    assert cls.doc() in desc["help"]["markdown"]
    assert desc["helpUri"].endswith(f"/blob/main/rules/{code}.md")
    assert (ROOT / "rules" / f"{code}.md").is_file()


@pytest.mark.parametrize("severity,level", [("error", "error"), ("warning", "warning"), ("info", "note")])
def test_levels(severity, level):
    log = json.loads(sarif.render(_report([_finding(severity=severity)])))
    assert _errors(log) == []
    assert log["runs"][0]["results"][0]["level"] == level


def test_rule_ids_index_into_the_rules_array():
    log = json.loads(sarif.render(_report([_finding("GA101"), _finding("GA102", module="g")])))
    run = log["runs"][0]
    for res in run["results"]:
        assert run["tool"]["driver"]["rules"][res["ruleIndex"]]["id"] == res["ruleId"]


@pytest.mark.parametrize(
    "a,b,same",
    [
        (dict(line=3), dict(line=40), True),  # moving the line keeps the alert
        (dict(message="x"), dict(message="y"), True),  # new numbers keep it too
        (dict(module="fc"), dict(module="fc2"), False),
        (dict(rule="GA101"), dict(rule="GA102"), False),
        (dict(path="a.py"), dict(path="b.py"), False),
    ],
)
def test_partial_fingerprints(a, b, same):
    def fp(kw):
        log = json.loads(sarif.render(_report([_finding(**kw)])))
        return log["runs"][0]["results"][0]["partialFingerprints"][sarif.FINGERPRINT_KEY]

    assert (fp(a) == fp(b)) is same


def test_absolute_path_outside_the_root_is_a_file_uri(tmp_path):
    outside = tmp_path / "elsewhere.py"
    log = sarif.to_sarif([_report([_finding(path=str(outside))])], base=str(ROOT))
    art = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art["uri"] == outside.as_uri() and "uriBaseId" not in art
    assert _errors(log) == []


def test_finding_without_location_points_at_the_target_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("x = 1\n")
    log = json.loads(sarif.render(_report([_finding(path=None)], target="net.py:build")))
    phys = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == "net.py" and phys["region"]["startLine"] == 1


def test_render_many_is_one_run_with_every_result():
    log = json.loads(sarif.render_many([_report([_finding()], target="a.py"), _report([_finding(), _finding()], target="b.py")]))
    assert len(log["runs"]) == 1 and len(log["runs"][0]["results"]) == 3
    assert _errors(log) == []


def test_results_capped_at_github_limit_keeping_the_most_severe():
    n = sarif.MAX_RESULTS + 7
    findings = [_finding(severity="info", module=f"m{i}") for i in range(n - 3)] + [
        _finding(severity="error", module=f"e{i}") for i in range(3)
    ]
    log = sarif.to_sarif([_report(findings)])
    run = log["runs"][0]
    assert len(run["results"]) == sarif.MAX_RESULTS
    assert sum(r["level"] == "error" for r in run["results"]) == 3
    assert run["properties"]["truncated"] is True
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert re.match(r"7 results were left out", notes[0]["message"]["text"])


def test_long_messages_are_cut():
    log = json.loads(sarif.render(_report([_finding(message="x" * 50_000)])))
    assert len(log["runs"][0]["results"][0]["message"]["text"]) == sarif.MAX_MESSAGE


def test_suppressed_findings_carry_a_sarif_suppression():
    item = _finding().to_json() | {"suppressed_by": "noqa", "suppression": "# gradaudit: noqa at net.py:3"}
    log = json.loads(sarif.render(_report([], suppressed=[item])))
    assert _errors(log) == []
    (res,) = log["runs"][0]["results"]
    assert res["suppressions"] == [{"kind": "inSource", "justification": "# gradaudit: noqa at net.py:3"}]


def test_non_finite_numbers_stay_valid_json():
    text = sarif.render(_report([_finding(data={"ratio": float("inf"), "x": float("nan")})]))
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    log = json.loads(text, parse_constant=reject)  # strict JSON: no Infinity / NaN literals
    assert log["runs"][0]["results"][0]["properties"]["data"] == {"ratio": "inf", "x": "nan"}


def test_uris_are_percent_encoded(tmp_path):
    log = sarif.to_sarif([_report([_finding(path=str(tmp_path / "my models" / "net 1.py"))])], base=str(tmp_path))
    art = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art == {"uri": "my%20models/net%201.py", "uriBaseId": "%SRCROOT%", "index": 0}
    assert log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.as_uri() + "/"


def test_srcroot_can_be_left_out():
    log = sarif.to_sarif([_report([_finding()])], srcroot=False)
    assert "originalUriBaseIds" not in log["runs"][0] and _errors(log) == []
    assert log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uriBaseId"] == "%SRCROOT%"
