"""Gold files: the HTML, SARIF and JSON reports of a small fixed model
(tests/gold/tiny_model.py), scrubbed of versions, times and absolute paths, must match
tests/gold/tiny_model.{html,sarif,json}: the same structure and words, the numbers
compared as numbers (gradaudit.catalog: data within a relative 1e-3, shown numbers at the
precision they are shown with), never as rounded strings, so the float differences
between machines, thread counts and torch versions cannot fail them.

After an intended change of the reports, update the gold files with one command and
review the diff:

    GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gradaudit.catalog import data_difference, difference, scrub, shown_agree

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
    compare = difference if fmt == "html" else data_difference
    if UPDATE and (not gold.is_file() or compare(got, gold.read_text(encoding="utf-8")) is not None):
        gold.write_text(got, encoding="utf-8")  # only a real change: no churn from the last bits of floats
    assert gold.is_file(), f"no gold file {gold.name}: run GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py"
    diff = compare(got, gold.read_text(encoding="utf-8"))
    assert diff is None, (
        f"{gold.name}: {diff}; if the change is intended: GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_gold.py"
    )


@pytest.mark.parametrize(
    "got,want,same",
    [
        ("gain 1.25 at layer 3", "gain 1.25 at layer 3", True),
        ("gain 1.2500001 at layer 3", "gain 1.25 at layer 3", True),  # float rounding
        ('"x": 2.5e-07', '"x": 2.5000002e-07', True),
        # a value on a rounding boundary, shown rounded either way (0.2045 -> 0.204 / 0.205)
        ("grad RMS 0.204", "grad RMS 0.205", True),
        ("grad RMS 1.65e-05", "grad RMS 1.66e-05", True),
        ("falls 6e+05x", "falls 6.01e+05x", True),  # .3g drops trailing zeros: 6e+05 is 6.00e+05
        ("RMS 0.999 -> 1", "RMS 1 -> 1", True),
        ("every 983 layers", "every 984 layers", True),  # 3 significant digits
        ("+1.3 decades", "+1.4 decades", True),  # .1f: 1.35 either way
        # changes beyond the rounding of the shown digits
        ("grad RMS 0.203", "grad RMS 0.205", False),
        ("gain 1.27 at layer 3", "gain 1.25 at layer 3", False),
        ("falls 6.03e+05x", "falls 6.01e+05x", False),
        ("+1.2 decades", "+1.4 decades", False),
        ("over 38 weight layers", "over 39 weight layers", False),  # a count is exact
        ("model[58]", "model[59]", False),
        ("gain 1.25 at layer 4", "gain 1.25 at layer 3", False),
        ("gain 1.25 at node 3", "gain 1.25 at layer 3", False),
        ("gain 1.25 at layer 3 of 9", "gain 1.25 at layer 3", False),
        ("gain -1.25", "gain 1.25", False),
        # numbers inside names and versions are words: compared exactly
        ("GA102", "GA101", False),
        ("features_15", "features_16", False),
        ("features.15", "features.16", False),
        ("version 2.1.0", "version 2.1.1", False),
        ("float32", "float64", False),
        ("fingerprint 12e45abc0", "fingerprint 12e46abc0", False),
        ("fingerprint 9e999", "fingerprint 9e998", False),
        ("shape 64x32", "shape 64x33", False),
    ],
)
def test_difference_allows_only_the_rounding_of_the_shown_digits(got, want, same):
    assert (difference(got, want) is None) is same
    assert (difference(want, got) is None) is same


@pytest.mark.parametrize(
    "got,want,same",
    [
        ({"grad_rms": 0.204509}, {"grad_rms": 0.2045}, True),
        ({"grad_rms": 0.2045}, {"grad_rms": 0.2047}, True),  # within 1e-3
        ({"grad_rms": 0.2045}, {"grad_rms": 0.2050}, False),  # 2.4e-3 apart
        ({"n_layers": 38}, {"n_layers": 39}, False),
        ({"n_layers": 38}, {"n_layers": 38.0}, True),
        ({"ok": True}, {"ok": 1}, False),
        ({"v": "nan"}, {"v": 0.1}, False),
        ({"v": None}, {"v": 0.0}, False),
        ({"a": [1.0, 2.0]}, {"a": [1.0]}, False),
        ({"a": 1.0}, {"a": 1.0, "b": 2.0}, False),
        ({"message": "falls 6.01e+05x"}, {"message": "falls 6e+05x"}, True),
        ({"message": "falls 6.01e+05x"}, {"message": "rises 6e+05x"}, False),
    ],
)
def test_data_difference_compares_values(got, want, same):
    assert (data_difference(json.dumps(got), json.dumps(want)) is None) is same
    assert (data_difference(json.dumps(want), json.dumps(got)) is None) is same


def test_shown_numbers_agree_whenever_the_values_do():
    """The property the comparison rests on: two values within the tolerance agree when
    shown with any of the formats the reports use, on whichever side of a rounding
    boundary each one falls."""
    import random

    rng = random.Random(0)
    for _ in range(20000):
        x = 10 ** rng.uniform(-8, 6) * rng.choice((1, -1))
        y = x * (1 + rng.uniform(-1e-4, 1e-4))
        for spec in (".3g", ".6g", ".1f", ".2f", "g"):
            a, b = format(x, spec), format(y, spec)
            assert shown_agree(a, b), (spec, x, y, a, b)


def test_a_stale_gold_still_fails(report, monkeypatch):
    """What the comparison must still catch on a real page: a number off by 2 %, a word,
    a finding less."""
    import re

    from gradaudit.report import html

    monkeypatch.chdir(ROOT)
    page = scrub(html.render(report), "html", root=str(ROOT))
    assert difference(page, page) is None
    cell = re.search(r'<td class="num">(\d\.\d+)</td>', page)
    off = page[: cell.start(1)] + f"{float(cell.group(1)) * 1.02:.3g}" + page[cell.end(1):]
    assert difference(off, page) is not None
    assert difference(page.replace("weight layers", "layers", 1), page) is not None
    first = page.index('<article class="finding"')
    cut = page[:first] + page[page.index("</article>", first) + len("</article>"):]
    assert difference(cut, page) is not None


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


def test_json_numbers_keep_six_significant_digits():
    """The data comparison's tolerance (1e-3) needs the data to carry far finer numbers:
    a fixed 4 decimals would leave -0.0049404 as -0.0049, 8e-3 from its neighbour's -0.0050."""
    from gradaudit.propagation.depth import DepthSummary

    out = DepthSummary(3, 0.72108512, -0.0049404912, -0.71031437, None, 607.2235).to_json()
    assert out["decades_per_layer"] == -0.00494049 and out["spread_decades"] == 0.721085
    assert out["layers_per_decade"] == pytest.approx(1 / 0.0049404912, rel=5e-6) and out["vanish_depth"] is None
