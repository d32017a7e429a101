"""The rule catalog: every registered rule is documented, well named and tested."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from gradaudit.rules.base import CATEGORIES, SEVERITIES, Rule, all_rules

RULES = all_rules()
TESTS = Path(__file__).resolve().parent.parent
SECTIONS = ("What it does", "Why is this bad?", "Example", "Use instead", "References")
#: Codes whose failing/passing models live in tests/rules/test_<rule module>.py.
STATIC_CATALOG = re.compile(r"GA[1-5]\d\d")


def _test_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_catalog.py"}


SOURCES = _test_sources()


def test_registry_is_not_empty():
    assert len(RULES) >= 16


@pytest.mark.parametrize("code", list(RULES))
def test_documented(code):
    cls = RULES[code]
    sections = cls.doc_sections()
    for name in SECTIONS:
        assert sections.get(name), f"{code}: docstring lacks '## {name}'"
    assert cls.summary()


@pytest.mark.parametrize("code", list(RULES))
def test_named_and_categorised(code):
    cls = RULES[code]
    assert re.fullmatch(r"GA\d{3}", cls.code) and cls.code == code
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.name)
    assert cls.category in CATEGORIES
    assert cls.default_severity in SEVERITIES


@pytest.mark.parametrize("code", list(RULES))
def test_one_rule_per_module(code):
    module = inspect.getmodule(RULES[code])
    rules_here = [
        c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, Rule) and c is not Rule and c.__module__ == module.__name__
    ]
    assert rules_here == [RULES[code]]


def test_every_rule_module_holds_a_rule():
    """Each public module directly in gradaudit/rules is a rule; its subpackages
    (:mod:`gradaudit.rules.evidence`) hold none."""
    import gradaudit.rules as pkg

    found = {i.name: i.ispkg for i in pkgutil.iter_modules(pkg.__path__) if i.name != "base" and not i.name.startswith("_")}
    assert "evidence" in found and found["evidence"]
    modules = {f"{pkg.__name__}.{name}" for name, is_pkg in found.items() if not is_pkg}
    assert {cls.__module__ for cls in RULES.values()} == modules


def test_codes_and_names_unique():
    names = [cls.name for cls in RULES.values()]
    assert len(set(names)) == len(names)
    assert len(set(RULES)) == len(RULES)


@pytest.mark.parametrize("code", list(RULES))
def test_has_a_test(code):
    """Some test file outside this one names the code."""
    assert any(f'"{code}"' in src or f"'{code}'" in src for src in SOURCES.values()), f"no test mentions {code}"


@pytest.mark.parametrize("code", [c for c in RULES if STATIC_CATALOG.fullmatch(c)])
def test_static_rule_has_failing_and_passing_models(code):
    """GA1xx-GA5xx: the module is named after the rule, and tests/rules/test_<module>.py
    selects that code and holds at least one failing and one passing model."""
    cls = RULES[code]
    module = cls.__module__.rsplit(".", 1)[1]
    assert module == cls.name.replace("-", "_")
    path = Path(__file__).resolve().parent / f"test_{module}.py"
    assert path.exists(), f"{path.name} missing"
    test_mod = importlib.import_module(f"test_{module}")
    assert test_mod.CODE == code
    expects = [case.values[1] for case in test_mod.CASES]
    assert any(bool(e) for e in expects), "no failing model"
    assert any(not e for e in expects), "no passing model"
