"""``--format github``: workflow-command annotations, escaped as the Actions runner
parses them, with the exit status the findings call for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradaudit.propagation.depth import summarize
from gradaudit.report import github
from gradaudit.report.model import AuditReport
from gradaudit.rules.base import Finding

ROOT = Path(__file__).resolve().parent.parent

COMMAND = re.compile(r"^::(?P<cmd>[a-z]+)(?: (?P<props>[^:]*))?::(?P<data>.*)$")


def _unescape_data(s: str) -> str:
    # the runner's unescape order (actions/runner ActionCommand.cs): %0D, %0A, then %25
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def _unescape_prop(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":").replace("%2C", ",").replace("%25", "%")


def parse(line: str) -> tuple[str, dict, str]:
    """A workflow command line as the Actions runner reads it."""
    m = COMMAND.match(line)
    assert m, line
    props = {}
    for pair in (m["props"] or "").split(","):
        if pair:
            k, _, v = pair.partition("=")
            props[k] = _unescape_prop(v)
    return m["cmd"], props, _unescape_data(m["data"])


def _finding(severity="error", message="m", path="net.py", line=3, module="fc", fix=None, rule="GA101"):
    return Finding(rule=rule, name="vanishing-gradients", category="vanishing", severity=severity, message=message,
                   fix=fix, node="n", module=module, location={"path": path, "line": line} if path else None)


def _report(findings, target="net.py"):
    return AuditReport(target=target, frontend="fx", input_source="given", inputs=[], findings=findings, layers=[],
                       depth=summarize([]))


@pytest.mark.parametrize("raw,escaped", [("a%b", "a%25b"), ("a\nb", "a%0Ab"), ("a\rb", "a%0Db"), ("100%\n", "100%25%0A"),
                                         ("a:b,c", "a:b,c")])
def test_escape_data(raw, escaped):
    assert github.escape_data(raw) == escaped


@pytest.mark.parametrize("raw,escaped", [("a:b", "a%3Ab"), ("a,b", "a%2Cb"), ("50%", "50%25"), ("x\ny", "x%0Ay")])
def test_escape_property(raw, escaped):
    assert github.escape_property(raw) == escaped


@pytest.mark.parametrize("severity,cmd", [("error", "error"), ("warning", "warning"), ("info", "notice")])
def test_command_per_severity(severity, cmd):
    (line,) = github.render(_report([_finding(severity=severity)])).splitlines()
    assert parse(line)[0] == cmd


@pytest.mark.parametrize(
    "message,path",
    [
        ("plain", "net.py"),
        ("ratio 1e-3: falls, then 100% gone\nsecond line\r", "dir,with:odd/na%me.py"),
        ("::error::injected", "models/net.py"),
    ],
)
def test_round_trip_through_the_runner_parser(message, path):
    (line,) = github.render(_report([_finding(message=message, path=path, line=12, fix="x = 1")])).splitlines()
    cmd, props, data = parse(line)
    assert (cmd, props) == ("error", {"file": path, "line": "12", "title": "GA101 vanishing-gradients"})
    assert data == f"{message}\nFix: x = 1"


def test_suppressed_findings_are_not_annotated():
    rep = _report([])
    rep.suppressed = [_finding().to_json() | {"suppressed_by": "noqa"}]
    assert github.render(rep) == ""


def _check(example, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "gradaudit", "check", str(example), "--format", "github", "-q"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_deep_sigmoid_annotates_the_user_line_and_fails():
    proc = _check("examples/deep_sigmoid.py")
    assert proc.returncode == 1, proc.stderr
    errors = [parse(line) for line in proc.stdout.splitlines() if line.startswith("::error")]
    src = (ROOT / "examples/deep_sigmoid.py").read_text().splitlines()
    line = next(i for i, text in enumerate(src, start=1) if "layer = nn.Linear(WIDTH, WIDTH)" in text)
    assert ("error", {"file": "examples/deep_sigmoid.py", "line": str(line), "title": "GA101 vanishing-gradients"}) in [
        (c, p) for c, p, _ in errors
    ]


def test_healthy_model_exits_zero_without_errors(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\nimport torch.nn as nn\n\n"
        "model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))\n"
        "example_inputs = (torch.randn(4, 16),)\n"
    )
    proc = _check("net.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("::error")]
