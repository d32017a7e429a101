"""Suppressions: noqa comments on a layer's definition or call line, per-module
ignores, and GA901 for suppressions that matched nothing (like ruff's RUF100)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gradaudit.suppress import DefinitionFinder, _comment_noqa, parse_noqa

ROOT = Path(__file__).resolve().parent.parent

MODEL = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 16)  # STEM
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(19))  # BLOCKS
        self.head = nn.Linear(16, 1)
        for layer in [self.stem, *self.blocks]:
            nn.init.normal_(layer.weight, std=1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = torch.sigmoid(self.stem(x))
        for block in self.blocks:
            x = torch.sigmoid(block(x))  # CALL
        return self.head(x)


torch.manual_seed(0)
model = Net()
example_inputs = (torch.randn(8, 16),)
'''


@pytest.mark.parametrize(
    "line,expected",
    [
        ("x = 1  # gradaudit: noqa", None),
        ("x = 1  # gradaudit: noqa[GA101]", ("GA101",)),
        ("x = 1  # gradaudit: noqa[GA101, ga3]", ("GA101", "GA3")),
        ("x = 1  # gradaudit:noqa[GA101,GA102]", ("GA101", "GA102")),
        ("x = 1  #gradaudit: NOQA", None),
    ],
)
def test_parse_noqa_codes(line, expected):
    parsed = parse_noqa(line)
    assert parsed is not None and parsed[1] == expected


@pytest.mark.parametrize("line", ["x = 1  # noqa", "x = 1  # noqa: E501", "x = 1", "# gradaudit noqa"])
def test_not_a_gradaudit_noqa(line):
    assert parse_noqa(line) is None


def test_noqa_inside_a_string_is_not_a_comment():
    assert _comment_noqa('msg = "# gradaudit: noqa"\n') is None
    assert _comment_noqa('msg = "# x"  # gradaudit: noqa[GA101]\n')[1] == ("GA101",)


def _line(src: str, marker: str) -> int:
    (n,) = [i for i, text in enumerate(src.splitlines(), start=1) if marker in text]
    return n


def _audit(tmp_path, monkeypatch, src=MODEL, **options):
    import gradaudit
    from gradaudit.loading import load_target
    from gradaudit.state import fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(textwrap.dedent(src).lstrip())
    loaded = load_target("net.py")
    before = fingerprint(loaded.model)
    report = gradaudit.audit(loaded.model, loaded.inputs, target="net.py", select=options.pop("select", ["GA101", "GA901"]),
                             **options)
    assert fingerprint(loaded.model) == before
    return report, (tmp_path / "net.py").read_text()


def _rules(findings):
    return sorted((f["rule"] if isinstance(f, dict) else f.rule) for f in findings)


def test_baseline_finding_at_the_call_line(tmp_path, monkeypatch):
    report, src = _audit(tmp_path, monkeypatch)
    (f,) = report.findings
    assert f.rule == "GA101" and f.module.startswith("blocks.")
    assert f.location == {"path": "net.py", "line": _line(src, "# CALL")}
    assert report.suppressed == []


@pytest.mark.parametrize("marker", ["# CALL", "# BLOCKS"])
@pytest.mark.parametrize("comment", ["# gradaudit: noqa[GA101]", "# gradaudit: noqa[GA1]", "# gradaudit: noqa"])
def test_noqa_on_call_or_definition_line(tmp_path, monkeypatch, marker, comment):
    report, src = _audit(tmp_path, monkeypatch, MODEL.replace(marker, comment))
    assert report.findings == []
    (s,) = report.suppressed
    assert s["rule"] == "GA101" and s["suppressed_by"] == "noqa"
    assert s["suppression"].endswith(f"net.py:{_line(src, comment)}")


def test_noqa_for_another_code_keeps_the_finding_and_is_reported_unused(tmp_path, monkeypatch):
    report, src = _audit(tmp_path, monkeypatch, MODEL.replace("# CALL", "# gradaudit: noqa[GA102]"))
    assert _rules(report.findings) == ["GA101", "GA901"]
    (unused,) = [f for f in report.findings if f.rule == "GA901"]
    assert unused.severity == "info" and "no GA102 finding" in unused.message
    assert unused.location == {"path": "net.py", "line": _line(src, "noqa[GA102]")}
    assert unused.fix == "remove the comment"


def test_partly_used_noqa_names_the_idle_code(tmp_path, monkeypatch):
    report, _ = _audit(tmp_path, monkeypatch, MODEL.replace("# CALL", "# gradaudit: noqa[GA101, GA102]"))
    (unused,) = report.findings
    assert unused.rule == "GA901" and unused.message.endswith(": no GA102 finding on this line")
    assert unused.data["codes"] == ["GA102"]
    assert unused.fix == "# gradaudit: noqa[GA101]"
    assert _rules(report.suppressed) == ["GA101"]


def test_bare_noqa_on_a_quiet_line_is_unused(tmp_path, monkeypatch):
    report, src = _audit(tmp_path, monkeypatch, MODEL.replace("# STEM", "# gradaudit: noqa"))
    assert _rules(report.findings) == ["GA101", "GA901"]


def test_unknown_code_is_reported(tmp_path, monkeypatch):
    report, _ = _audit(tmp_path, monkeypatch, MODEL.replace("# STEM", "# gradaudit: noqa[GA999]"))
    (unused,) = [f for f in report.findings if f.rule == "GA901"]
    assert "unknown rule code GA999" in unused.message


def test_unused_noqa_can_be_ignored(tmp_path, monkeypatch):
    report, _ = _audit(tmp_path, monkeypatch, MODEL.replace("# STEM", "# gradaudit: noqa"), select=["GA101"])
    assert _rules(report.findings) == ["GA101"]


@pytest.mark.parametrize(
    "ignores,suppressed",
    [
        ({"blocks.*": ["GA101"]}, True),
        ({"blocks.*": ["GA1"]}, True),
        ({"*": ["GA101"]}, True),
        ({"blocks.*": ["GA102"]}, False),
        ({"stem": ["GA101"]}, False),
        ({"encoder.*": ["GA101"]}, False),
    ],
)
def test_per_module_ignores(tmp_path, monkeypatch, ignores, suppressed):
    report, _ = _audit(tmp_path, monkeypatch, per_module_ignores=ignores)
    if suppressed:
        assert report.findings == [] and report.suppressed[0]["suppressed_by"] == "per-module-ignores"
    else:
        assert _rules(report.findings) == ["GA101"] and report.suppressed == []


def test_definition_lines_in_a_script_built_sequential(monkeypatch):
    import runpy

    monkeypatch.chdir(ROOT)
    path = "examples/deep_sigmoid.py"
    src = (ROOT / path).read_text()
    model = runpy.run_path(path)["model"]
    finder = DefinitionFinder(model, path)
    linears = [name for name, m in model.named_modules() if type(m).__name__ == "Linear"]
    loop_line = _line(src, "layer = nn.Linear(WIDTH, WIDTH)")
    head_line = _line(src, "layers.append(nn.Linear(WIDTH, 1))")
    assert [finder.location(n)["line"] for n in linears] == [loop_line] * (len(linears) - 1) + [head_line]
    sig = next(name for name, m in model.named_modules() if type(m).__name__ == "Sigmoid")
    assert finder.location(sig)["line"] == _line(src, "layers += [layer, nn.Sigmoid()]")


def test_definition_line_in_a_user_class(tmp_path, monkeypatch):
    import runpy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(MODEL)
    model = runpy.run_path("net.py")["model"]
    finder = DefinitionFinder(model, "net.py")
    assert finder.location("stem")["line"] == _line(MODEL, "# STEM")
    assert finder.location("blocks.7")["line"] == _line(MODEL, "# BLOCKS")
    assert finder.location("head")["line"] == _line(MODEL, "self.head = nn.Linear")
