"""The command line: exit codes, formats, -o, rules / explain, start-up cost."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from shown import depth_change, shows

from gradaudit.rules.base import all_rules

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEEP_SIGMOID = os.path.join(ROOT, "examples", "deep_sigmoid.py")
RESNET = os.path.join(ROOT, "examples", "resnet18.py")
SEVERITY = {"error": 0, "warning": 1, "info": 2}

MLP = """
import torch.nn as nn

def build_model():
    layers = []
    for _ in range(12):
        layer = nn.Linear(64, 64)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers)
"""


def _json(result):
    return json.loads(result.stdout)


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from gradaudit.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'rich', 'jinja2', 'matplotlib', 'onnx', 'numpy') if m in sys.modules]\n"
        "print('heavy=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "heavy="


def test_no_arguments_prints_help(cli):
    result = cli()
    assert result.exit_code == 0 and result.stdout.startswith("Usage: ") and "Commands:" in result.stdout


@pytest.mark.parametrize("command", ["check", "rules", "explain"])
def test_subcommand_help(command, cli):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout


def test_help_says_loading_runs_the_file(cli):
    assert "RUNS the Python file" in cli("check", "--help").stdout


def test_deep_sigmoid_exits_1_with_vanishing_finding(run):
    proc = run("check", DEEP_SIGMOID, "--format", "json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    vanishing = [f for f in report["findings"] if f["rule"] == "GA101"]
    assert vanishing and vanishing[0]["severity"] == "error" and vanishing[0]["category"] == "vanishing"
    assert report["summary"]["verdict"] == "vanishing"
    # the human summary went to stderr, the JSON alone to stdout
    assert "GA101" in proc.stderr


def test_resnet18_exits_0(run):
    proc = run("check", RESNET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("HEALTHY")


def test_python_m_gradaudit_version(run):
    proc = run("--version")
    from gradaudit import __version__

    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("fail_on", ["error", "warning", "info"])
def test_fail_on(fail_on, cli, write, tmp_path):
    write("net.py", MLP)
    result = cli("check", "net.py", "--format", "json", "--fail-on", fail_on, cwd=tmp_path)
    findings = _json(result)["findings"]
    assert any(f["severity"] == "warning" for f in findings)
    expected = 1 if any(SEVERITY[f["severity"]] <= SEVERITY[fail_on] for f in findings) else 0
    assert result.exit_code == expected


def test_exit_zero(cli):
    result = cli("check", DEEP_SIGMOID, "--exit-zero", "--format", "json")
    assert result.exit_code == 0 and _json(result)["summary"]["counts"]["error"] >= 1


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--select", "GA101"], {"GA101"}),
        (["--select", "GA1"], None),
        (["--ignore", "GA101"], None),
        (["--select", "GA101,GA102", "--ignore", "GA102"], {"GA101"}),
        (["--select", "GA101", "--select", "GA102"], None),
    ],
)
def test_select_ignore(flags, expected, cli):
    full = {f["rule"] for f in _json(cli("check", DEEP_SIGMOID, "--format", "json"))["findings"]}
    got = {f["rule"] for f in _json(cli("check", DEEP_SIGMOID, "--format", "json", *flags))["findings"]}
    selected = {c for flag, v in zip(flags[::2], flags[1::2]) if flag == "--select" for c in v.split(",")}
    ignored = {c for flag, v in zip(flags[::2], flags[1::2]) if flag == "--ignore" for c in v.split(",")}
    want = {r for r in full if (not selected or any(r.startswith(s) for s in selected))}
    want = {r for r in want if not any(r.startswith(s) for s in ignored)}
    assert got == want
    if expected is not None:
        assert got == expected


def test_json_contract(cli):
    report = _json(cli("check", DEEP_SIGMOID, "--format", "json"))
    assert report["format_version"] == 1
    assert report["frontend"] == "fx"
    assert report["summary"]["verdict"] in ("healthy", "vanishing", "exploding", "saturation", "dead-units", "init",
                                            "normalization", "residual", "nan", "gradcheck", "precision", "other")
    assert "gradient_spread_decades" in report["summary"]
    for f in report["findings"]:
        assert {"rule", "name", "category", "severity", "message", "fix", "node", "module", "location"} <= set(f)
        assert f["location"] is None or set(f["location"]) == {"path", "line"}
    linears = [layer for layer in report["layers"] if layer["op"] == "linear"]
    assert len(linears) == 31  # every parameterized module call is listed
    for layer in report["layers"]:
        assert {"node", "module", "op", "predicted", "measured"} <= set(layer)
        weight = layer["depth"] is not None  # weight layers carry the layer gradient too
        assert set(layer["predicted"]) == ({"act_rms", "grad_rms", "layer_grad"} if weight else {"act_rms", "grad_rms"})
        assert layer["measured"] is None
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in layer["predicted"].values())


def test_json_several_targets(cli, write, tmp_path):
    write("net.py", MLP)
    result = cli("check", "net.py", DEEP_SIGMOID, "--format", "json", cwd=tmp_path)
    doc = _json(result)
    assert doc["format_version"] == 1 and [r["target"] for r in doc["reports"]] == ["net.py", DEEP_SIGMOID]
    assert result.exit_code == 1  # the worst target decides


def test_output_file_is_written_whole(cli, tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old content")
    result = cli("check", DEEP_SIGMOID, "--format", "json", "-o", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(out.read_text())["format_version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_output_to_dev_null(cli):
    if not os.path.exists(os.devnull):
        pytest.skip("no null device")
    result = cli("check", DEEP_SIGMOID, "--format", "json", "-o", os.devnull)
    assert result.exit_code == 1 and os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_text_report_to_file_has_no_colour(cli, tmp_path):
    out = tmp_path / "report.txt"
    cli("check", DEEP_SIGMOID, "-o", out)
    text = out.read_text()
    assert text.startswith("VANISHING") and "\x1b[" not in text and "GA101" in text


def test_text_report_layout(cli):
    result = cli("check", DEEP_SIGMOID, "--select", "GA101")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("VANISHING  predicted weight-gradient scale falls ")
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    assert any("GA101 vanishing-gradients" in line for line in lines)
    assert any(line.strip().startswith("fix: ") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["#", "module", "op", "act", "RMS"])
    rows = [line.split() for line in lines[header + 1:] if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 31
    assert lines[-1].startswith("inputs: 64x32 float32 (example_inputs in ")


def test_first_layer_ratio_in_verdict_matches_layers(cli):
    """The verdict's "falls X" is GA101's figure from the layer_grad column."""
    report = _json(cli("check", DEEP_SIGMOID, "--format", "json"))
    grads = [layer["predicted"]["layer_grad"] for layer in report["layers"] if layer["depth"] is not None]
    text = cli("check", DEEP_SIGMOID).stdout.splitlines()[0]
    assert shows(text, " falls {}x ", 10 ** -depth_change(grads))


EXPLODING_MLP = """
import torch
import torch.nn as nn

def build_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(24):
        layer = nn.Linear(128, 128)
        nn.init.normal_(layer.weight, std=(4.0 / 128) ** 0.5)  # twice He's variance: gradients grow
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers)
"""


def test_exploding_verdict_matches_layers(cli, write, tmp_path):
    write("boom.py", EXPLODING_MLP)
    report = _json(cli("check", "boom.py", "--format", "json", cwd=tmp_path))
    assert report["summary"]["verdict"] == "exploding"
    grads = [layer["predicted"]["grad_rms"] for layer in report["layers"] if layer["depth"] is not None]
    # the mean-field oracle: chi = n Var[w] E[relu'^2] = 4 * 1/2 = 2 per layer, sqrt(2) in RMS
    per_layer = (grads[0] / grads[-1]) ** (1 / (len(grads) - 1))
    assert math.log2(per_layer) == pytest.approx(0.5, abs=0.15)
    first = cli("check", "boom.py", cwd=tmp_path).stdout.splitlines()[0]
    assert first.startswith("EXPLODING  predicted weight-gradient scale grows ")
    assert shows(first, " grows {}x ", 10 ** depth_change(grads))  # an MLP: layer grad = grad RMS


def test_skip_missing_skips_files_without_models(cli, write, tmp_path):
    write("util.py", "def helper():\n    return 1\n")
    write("torchy.py", "import torch\nWIDTH = 3\n")
    result = cli("check", "--skip-missing", "util.py", "torchy.py", cwd=tmp_path)
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    result = cli("check", "util.py", cwd=tmp_path)
    assert result.exit_code == 2


def test_probe_options_are_passed_through(cli, monkeypatch, write, tmp_path):
    import gradaudit.api
    from gradaudit.options import AuditOptions

    seen = []
    real = gradaudit.api.run

    def spy(model, inputs, opts, **kwargs):
        seen.append(opts)
        return real(model, inputs, AuditOptions(), **kwargs)

    monkeypatch.setattr(gradaudit.api, "run", spy)
    write("net.py", MLP)
    cli("check", "net.py", "--probe", "--draws", "3", "--inputs", "batch.pt", "--dtype", "bf16", "--device", "cpu",
        "--gradcheck", "--gradcheck-module", "a", "--gradcheck-module", "b", cwd=tmp_path)
    assert seen[-1] == AuditOptions(probe=True, draws=3, inputs_path="batch.pt", dtype="bf16", device="cpu",
                                    gradcheck=True, gradcheck_modules=("a", "b"))
    cli("check", "net.py", cwd=tmp_path)
    assert seen[-1] == AuditOptions()


@pytest.mark.parametrize("code", sorted(all_rules()))
def test_rules_lists_every_rule(code, cli):
    rows = {r["code"]: r for r in json.loads(cli("rules", "--format", "json").stdout)}
    cls = all_rules()[code]
    assert rows[code]["name"] == cls.name and rows[code]["severity"] == cls.default_severity
    assert rows[code]["category"] == cls.category and rows[code]["summary"]
    assert any(line.split()[:2] == [code, cls.name] for line in cli("rules").stdout.splitlines())


@pytest.mark.parametrize("code", sorted(all_rules()))
def test_explain_prints_the_docstring(code, cli):
    result = cli("explain", code.lower())
    cls = all_rules()[code]
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].startswith(f"{code} {cls.name} ({cls.category}")
    assert "## What it does" in result.stdout and "## Why is this bad?" in result.stdout
    assert cls.doc() in result.stdout


def test_missing_renderer_is_a_clear_error(monkeypatch):
    import importlib

    from gradaudit.errors import ConfigError
    from gradaudit.report import get_renderer

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "gradaudit.report.sarif":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ConfigError, match="the sarif format is not available"):
        get_renderer("sarif")


class _FakeTTY:
    def __init__(self):
        self.parts = []

    def isatty(self):
        return True

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("no_color,coloured", [(None, True), ("1", False)])
def test_colour_only_on_a_terminal_without_no_color(no_color, coloured, monkeypatch):
    from gradaudit.report.text import make_console

    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    stream = _FakeTTY()
    make_console(stream).print("[bold red]GA101[/]")
    assert ("\x1b[" in "".join(stream.parts)) == coloured


def test_output_file_gets_the_usual_permissions(tmp_path):
    """-o writes through a private temp file; the report itself is readable like any file."""
    import os
    import stat

    from click.testing import CliRunner

    from gradaudit.cli import main

    out = tmp_path / "audit.json"
    mask = os.umask(0o022)
    try:
        example = os.path.join(ROOT, "examples", "relu_he_30.py")
        result = CliRunner().invoke(main, ["check", example, "--format", "json", "-o", str(out), "-q"])
    finally:
        os.umask(mask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
