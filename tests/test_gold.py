"""Gold files: the HTML, SARIF and JSON reports of a small fixed model
(tests/gold/tiny_model.py), scrubbed of versions, times and absolute paths, must match
tests/gold/tiny_model.{html,sarif,json}.

After an intended change of the reports, update the gold files with one command and
review the diff:

    GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gradaudit.catalog import difference, scrub

ROOT = Path(__file__).resolve().parent.parent
GOLD = Path(__file__).parent / "gold"
TARGET = "tests/gold/tiny_model.py"
UPDATE = os.environ.get("GRADAUDIT_UPDATE_GOLD") == "1"


@pytest.fixture(scope="module")
def report():
    import gradaudit
    from gradaudit.loading import load_target

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        loaded = load_target(TARGET)
        # a fixed set of rules: the gold files test the renderers, not the growing catalog
        yield gradaudit.audit(loaded.model, loaded.inputs, target=TARGET, input_source=loaded.input_source,
                              select=["GA101", "GA102", "GA901"])
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("fmt,ext", [("html", "html"), ("sarif", "sarif"), ("json", "json")])
def test_gold(report, fmt, ext, monkeypatch):
    from gradaudit.report import get_renderer

    monkeypatch.chdir(ROOT)
    text = get_renderer(fmt).render(report)
    if fmt == "sarif":  # rule metadata is the rules' docstrings, checked in test_sarif.py and by the catalog
        log = json.loads(text)
        for run in log["runs"]:
            run["tool"]["driver"]["rules"] = [{"id": r["id"]} for r in run["tool"]["driver"]["rules"]]
        text = json.dumps(log)
    got = scrub(text, "html" if fmt == "html" else "json", root=str(ROOT))
    gold = GOLD / f"tiny_model.{ext}"
    if UPDATE:
        gold.write_text(got, encoding="utf-8")
    assert gold.is_file(), f"no gold file {gold.name}: run GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py"
    diff = difference(got, gold.read_text(encoding="utf-8"))
    assert diff is None, (
        f"{gold.name}: {diff}; if the change is intended: GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py"
    )


@pytest.mark.parametrize(
    "got,want,same",
    [
        ("gain 1.25 at layer 3", "gain 1.25 at layer 3", True),
        ("gain 1.2500001 at layer 3", "gain 1.25 at layer 3", True),  # float rounding
        ('"x": 2.5e-07', '"x": 2.5000002e-07', True),
        ("gain 1.26 at layer 3", "gain 1.25 at layer 3", False),
        ("gain 1.25 at layer 4", "gain 1.25 at layer 3", False),
        ("gain 1.25 at node 3", "gain 1.25 at layer 3", False),
        ("gain 1.25 at layer 3 of 9", "gain 1.25 at layer 3", False),
        ("gain -1.25", "gain 1.25", False),
    ],
)
def test_difference_allows_only_float_rounding(got, want, same):
    assert (difference(got, want) is None) is same


def test_scrub_removes_what_varies(report, monkeypatch):
    from gradaudit.report import html, sarif

    monkeypatch.chdir(ROOT)
    page = scrub(html.render(report), "html", root=str(ROOT))
    log = scrub(sarif.render(report), "json", root=str(ROOT))
    import torch

    for text in (page, log):
        assert str(ROOT) not in text
        assert torch.__version__.split("+")[0] not in text
    assert "<th>time taken</th><td><TIME>" in page
