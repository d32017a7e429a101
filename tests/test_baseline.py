"""``--baseline FILE`` / ``--update-baseline``: a baseline written for the deep-sigmoid
example lets the next check pass; a new layer that brings a new finding fails it, naming
only that finding; lines moving do not matter; every output format agrees; the
pre-commit hook honours it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
SIGMOID = (ROOT / "examples" / "deep_sigmoid.py").read_text()
#: A hidden layer with all rows equal after the sigmoid stack: GA204 symmetric-init (a warning).
NEW_LAYER = """model = build()
extra = nn.Linear(1, 16)
nn.init.constant_(extra.weight, 0.5)
model.append(extra)
model.append(nn.ReLU())
model.append(nn.Linear(16, 1))"""


def _with_new_layer() -> str:
    assert SIGMOID.count("model = build()") == 1
    return SIGMOID.replace("model = build()", NEW_LAYER)


@pytest.fixture
def project(tmp_path, cli):
    (tmp_path / "net.py").write_text(SIGMOID)
    res = cli("check", "net.py", "--baseline", "baseline.json", "--update-baseline", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    return tmp_path


def _rules(res) -> list[str]:
    data = json.loads(res.stdout)
    return [f["rule"] for f in data["findings"]]


def test_baseline_records_the_findings(project, cli):
    data = json.loads((project / "baseline.json").read_text())
    assert data["format_version"] == 1 and list(data["targets"]) == ["net.py"]
    plain = cli("check", "net.py", "--format", "json", cwd=project)
    want = sorted((f["rule"], f["module"]) for f in json.loads(plain.stdout)["findings"])
    assert sorted((f["rule"], f["module"]) for f in data["targets"]["net.py"]) == want
    assert {"GA101", "GA301", "GA302", "GA303"} <= {rule for rule, _ in want}


def test_next_check_passes_and_a_new_layer_fails_naming_only_it(project, cli):
    res = cli("check", "net.py", "--baseline", "baseline.json", "--fail-on", "warning", cwd=project)
    assert res.exit_code == 0, res.output
    assert "VANISHING" in res.stdout  # a known problem is still no all-clear
    assert "4 known finding(s) held by the baseline" in res.stdout
    (project / "net.py").write_text(_with_new_layer())
    res = cli("check", "net.py", "--baseline", "baseline.json", "--fail-on", "warning", "--format", "json", cwd=project)
    assert res.exit_code == 1
    assert _rules(res) == ["GA204"]
    without = cli("check", "net.py", "--fail-on", "warning", "--format", "json", cwd=project)
    assert set(_rules(without)) == {"GA101", "GA204", "GA301", "GA302", "GA303"}  # the others are still there


def test_moved_lines_do_not_matter(project, cli):
    (project / "net.py").write_text("# a comment\n\n\n" + SIGMOID.replace("import torch\n", "import torch\n\n\n"))
    res = cli("check", "net.py", "--baseline", "baseline.json", "--fail-on", "info", cwd=project)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "github", "markdown", "html"])
def test_every_format_shows_only_the_new_finding(project, cli, fmt):
    (project / "net.py").write_text(_with_new_layer())
    res = cli("check", "net.py", "--baseline", "baseline.json", "--fail-on", "warning", "--format", fmt, "-q",
              cwd=project)
    assert res.exit_code == 1
    out = res.stdout
    assert "GA204" in out
    if fmt == "sarif":
        results = json.loads(out)["runs"][0]["results"]
        live = [r["ruleId"] for r in results if not r.get("suppressions")]
        known = [r for r in results if r.get("suppressions")]
        assert live == ["GA204"] and len(known) == 4
        assert all(r["suppressions"][0]["kind"] == "external" for r in known)
    elif fmt == "json":
        data = json.loads(out)
        assert _rules(res) == ["GA204"]
        assert sorted(s["rule"] for s in data["suppressed"] if s["suppressed_by"] == "baseline") == [
            "GA101", "GA301", "GA302", "GA303"]
    elif fmt in ("github", "markdown", "text"):
        assert not any(code in out.replace("held by the baseline", "") for code in ("GA301", "GA302", "GA303"))


def test_update_keeps_other_targets(project, cli):
    (project / "other.py").write_text(SIGMOID)
    assert cli("check", "other.py", "--baseline", "baseline.json", "--update-baseline", cwd=project).exit_code == 0
    data = json.loads((project / "baseline.json").read_text())
    assert sorted(data["targets"]) == ["net.py", "other.py"]


def test_fixed_findings_are_pointed_out(project, cli):
    (project / "net.py").write_text((ROOT / "examples" / "relu_he_30.py").read_text())
    res = cli("check", "net.py", "--baseline", "baseline.json", "-q", cwd=project)
    assert res.exit_code == 0
    res = cli("check", "net.py", "--baseline", "baseline.json", cwd=project)
    assert "are gone (--update-baseline drops them)" in res.stderr


@pytest.mark.parametrize(
    "content,message",
    [(None, "no such baseline file"), ("{", "not a gradaudit baseline"), ('{"format_version": 1, "targets": []}', "must map"),
     ('{"format_version": 2}', "format_version 1")],
)
def test_bad_baseline_is_one_line_exit_2(tmp_path, cli, content, message):
    (tmp_path / "net.py").write_text(SIGMOID)
    if content is not None:
        (tmp_path / "b.json").write_text(content)
    res = cli("check", "net.py", "--baseline", "b.json", cwd=tmp_path)
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_update_needs_a_file(tmp_path, cli):
    (tmp_path / "net.py").write_text(SIGMOID)
    res = cli("check", "net.py", "--update-baseline", cwd=tmp_path)
    assert res.exit_code == 2 and "--update-baseline needs --baseline FILE" in res.stderr


HOOK = """\
repos:
  - repo: local
    hooks:
      - id: gradaudit
        name: gradaudit
        entry: gradaudit check --skip-missing --baseline gradaudit-baseline.json --fail-on warning
        language: system
        types: [python]
        require_serial: true
"""


def test_pre_commit_hook_with_a_baseline(tmp_path):
    import os

    from test_precommit import _run, make_repo

    work, env = make_repo(tmp_path, HOOK)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    (work / "net.py").write_text(SIGMOID)
    made = subprocess.run([sys.executable, "-m", "gradaudit", "check", "net.py", "--baseline",
                           "gradaudit-baseline.json", "--update-baseline", "-q"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert _run([sys.executable, "-m", "pre_commit", "install"], work, env).returncode == 0
    _run(["git", "add", "."], work, env)
    proc = _run(["git", "commit", "-q", "-m", "model with its baseline"], work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (work / "net.py").write_text(_with_new_layer())
    _run(["git", "add", "net.py"], work, env)
    proc = _run(["git", "commit", "-m", "a new layer"], work, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "GA204" in out
    assert not any(code in out for code in ("GA301", "GA302", "GA303"))
