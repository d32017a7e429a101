"""The generated catalog (rules/) and gallery (reports/) are up to date.

Regenerate them with ``make catalog`` (``gradaudit rules --markdown rules/`` and
``python -m gradaudit.catalog reports reports/``) when these fail.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gradaudit.catalog import data_difference, difference, example_targets, gallery, rule_markdown, rules_index, scrub
from gradaudit.rules.base import all_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = all_rules()
STALE = "stale: run `make catalog` and commit rules/ and reports/"


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_page_up_to_date(code):
    page = ROOT / "rules" / f"{code}.md"
    assert page.is_file(), STALE
    assert page.read_text(encoding="utf-8") == rule_markdown(RULES[code]), STALE


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_page_carries_every_docstring_section(code):
    page = (ROOT / "rules" / f"{code}.md").read_text(encoding="utf-8")
    for heading in ("What it does", "Why is this bad?", "Example", "Use instead", "References"):
        assert f"## {heading}\n" in page, f"{code}: docstring lacks '## {heading}'"


def test_rules_index_up_to_date():
    assert (ROOT / "rules" / "README.md").read_text(encoding="utf-8") == rules_index(RULES.values()), STALE


def test_no_pages_for_rules_that_do_not_exist():
    pages = {p.stem for p in (ROOT / "rules").glob("GA*.md")}
    assert pages == set(RULES), STALE


def test_every_rule_linked_from_the_index():
    index = (ROOT / "rules" / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"\]\((GA\d{3})\.md\)", index)) == set(RULES)


@pytest.fixture(scope="module")
def regenerated():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return gallery("examples")
    finally:
        os.chdir(cwd)


EXAMPLES = [Path(t).stem for t in example_targets(str(ROOT / "examples"))]


FORMATS = [("html", "html", difference), ("sarif", "json", data_difference), ("json", "json", data_difference)]


@pytest.mark.parametrize("stem", EXAMPLES)
@pytest.mark.parametrize("ext,kind,compare", FORMATS, ids=[f[0] for f in FORMATS])
def test_gallery_report_up_to_date(regenerated, stem, ext, kind, compare):
    """Same structure and words; numbers compared as numbers (see gradaudit.catalog), so
    that the float differences between machines and torch versions never fail it."""
    path = ROOT / "reports" / f"{stem}.{ext}"
    assert path.is_file(), STALE
    want = scrub(regenerated[f"{stem}.{ext}"], kind, root=str(ROOT))
    diff = compare(scrub(path.read_text(encoding="utf-8"), kind, root=str(ROOT)), want)
    assert diff is None, f"{STALE}: {diff}"


def test_a_stale_gallery_still_fails(regenerated):
    """What the comparison must still catch: a number off beyond the tolerance, a finding
    less, a changed word, in the data and on the page."""
    import copy
    import json

    want = scrub(regenerated["relu_xavier_30.json"], "json", root=str(ROOT))
    data = json.loads(want)
    for change in (
        lambda d: d["layers"][3]["predicted"].update(grad_rms=d["layers"][3]["predicted"]["grad_rms"] * 1.002),
        lambda d: d["summary"]["depth"].update(n_layers=d["summary"]["depth"]["n_layers"] + 1),
        lambda d: d["findings"].pop(),
        lambda d: d["findings"][0].update(message=d["findings"][0]["message"].replace("falls", "rises")),
        lambda d: d["findings"][0].update(severity="warning"),
    ):
        changed = copy.deepcopy(data)
        change(changed)
        assert data_difference(json.dumps(changed), want) is not None
    page = scrub(regenerated["relu_xavier_30.html"], "html", root=str(ROOT))
    cell = re.search(r'<td class="num">(\d\.\d+)</td>', page)
    off = page[: cell.start(1)] + f"{float(cell.group(1)) * 1.02:.3g}" + page[cell.end(1):]
    assert difference(page, page) is None and difference(off, page) is not None


def test_gallery_index_up_to_date(regenerated):
    assert (ROOT / "reports" / "README.md").read_text(encoding="utf-8") == regenerated["README.md"], STALE


def test_no_reports_for_examples_that_do_not_exist():
    have = {p.name for p in (ROOT / "reports").iterdir() if p.suffix in (".html", ".sarif", ".json")}
    assert have == {f"{s}.{e}" for s in EXAMPLES for e in ("html", "sarif", "json")}, STALE


def test_rules_markdown_command_writes_the_catalog(tmp_path):
    from click.testing import CliRunner

    from gradaudit.catalog import rule_pages
    from gradaudit.cli import main

    (tmp_path / "GA999.md").write_text("a page of a rule that is gone\n")
    result = CliRunner().invoke(main, ["rules", "--markdown", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0
    written = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()}
    assert written == rule_pages()
