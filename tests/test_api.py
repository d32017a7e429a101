"""The Python API: a typed signature, one pass of the rules, a report scripts can use."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch
import torch.nn as nn

import gradaudit
import gradaudit.api
from gradaudit.rules.base import all_rules

pytestmark = pytest.mark.oldest

PACKAGE = pathlib.Path(gradaudit.__file__).parent

OPTIONS = (
    "probe", "draws", "loss_fn", "batch", "gradcheck", "gradcheck_modules", "dtype", "device", "select", "ignore",
    "settings", "inputs_path", "input_stats", "per_module_ignores", "target", "input_source",
)


def _tanh_mlp(depth: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(32, 32), nn.Tanh())])


def test_signature_lists_every_option_keyword_only():
    params = inspect.signature(gradaudit.audit).parameters
    assert list(params)[:2] == ["model", "example_inputs"]
    for name in OPTIONS:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    doc = inspect.getdoc(gradaudit.audit)
    for name in ("probe", "draws", "loss_fn", "gradcheck", "dtype", "device", "select", "settings"):
        assert f"``{name}" in doc, name


def test_misspelled_option_is_a_type_error():
    with pytest.raises(TypeError, match="prob"):
        gradaudit.audit(_tanh_mlp(), torch.randn(4, 32), prob=True)


def test_rules_run_exactly_once_with_probe_and_gradcheck(monkeypatch):
    calls: dict[str, int] = {}
    for code, cls in all_rules().items():
        original = cls.check

        def counted(self, analysis, _code=code, _original=original):
            calls[_code] = calls.get(_code, 0) + 1
            return _original(self, analysis)

        monkeypatch.setattr(cls, "check", counted)
    gradaudit.audit(_tanh_mlp(), torch.randn(8, 32), probe=True, gradcheck=True)
    staged = {code for code, cls in all_rules().items() if cls.stage in ("static", "probe", "gradcheck")}
    assert calls == {code: 1 for code in staged}


def _imports(path: pathlib.Path) -> set[str]:
    """Every gradaudit module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("gradaudit")}


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        cur = stack.pop()
        if cur == goal:
            return True
        if cur not in seen:
            seen.add(cur)
            stack.extend(graph.get(cur, ()))
    return False


def test_no_import_path_from_the_probe_back_to_the_api():
    graph = _module_graph()
    probe_modules = [m for m in graph if m.startswith("gradaudit.probe")]
    assert probe_modules
    assert "gradaudit.probe.stage" in graph["gradaudit.api"] or _reaches(graph, "gradaudit.api", "gradaudit.probe.stage")
    for module in probe_modules:
        assert not _reaches(graph, module, "gradaudit.api"), module


def test_report_gate_and_exception():
    report = gradaudit.audit(_tanh_mlp(30), torch.randn(8, 32))
    assert report.verdict == "vanishing"
    assert not report.ok() and not report.ok("warning")
    with pytest.raises(gradaudit.FindingsError) as info:
        report.raise_for_findings()
    assert info.value.report is report
    assert "GA101" in str(info.value) and "VANISHING" in str(info.value)
    healthy = gradaudit.audit(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8))
    assert healthy.ok() and healthy.raise_for_findings() is healthy
    with pytest.raises(gradaudit.api.ConfigError):
        healthy.ok("fatal")


def test_report_serialisations(tmp_path):
    report = gradaudit.audit(_tanh_mlp(30), torch.randn(8, 32))
    sarif = report.to_sarif()
    assert sarif["version"] == "2.1.0"
    assert {r["ruleId"] for r in sarif["runs"][0]["results"]} == {f.rule for f in report.findings}
    out = tmp_path / "r.html"
    text = report.to_html(str(out))
    assert out.read_text(encoding="utf-8") == text and "GA101" in text
    assert report.to_json()["summary"]["verdict"] == "vanishing"
