"""``--format markdown``, rendered with a GitHub-flavoured Markdown parser (markdown-it-py
with GFM tables and strikethrough, GFM's table rules): the structure a reader sees on a
pull request — heading, findings with source and fix as code, a real table — and user
strings that cannot break out (pipes, backticks, HTML). The deep-sigmoid example's
markdown is a gold file."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.catalog import difference
from gradaudit.report import markdown

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
GOLD = Path(__file__).parent / "gold" / "deep_sigmoid.md"
UPDATE = os.environ.get("GRADAUDIT_UPDATE_GOLD") == "1"


def gfm(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)


class Tree(HTMLParser):
    """Tables (rows of cell texts), code blocks, headings, links and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.code: list[str] = []
        self.headings: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._code: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._code = []
        elif tag in ("h2", "h3"):
            self._heading = []
        elif tag == "a":
            self.links.append(dict(attrs).get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "pre":
            self.code.append("".join(self._code or []))
            self._code = None
        elif tag in ("h2", "h3"):
            self.headings.append("".join(self._heading or []))
            self._heading = None

    def handle_data(self, data):
        for part in (self._cell, self._code, self._heading):
            if part is not None:
                part.append(data)


def parse(text: str) -> Tree:
    tree = Tree()
    tree.feed(gfm(text))
    return tree


@pytest.fixture(scope="module")
def deep_sigmoid():
    from gradaudit.loading import load_target

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        loaded = load_target("examples/deep_sigmoid.py")
        yield gradaudit.audit(loaded.model, loaded.inputs, target="examples/deep_sigmoid.py",
                              input_source=loaded.input_source)
    finally:
        os.chdir(cwd)


def test_structure_as_github_renders_it(deep_sigmoid):
    tree = parse(markdown.render(deep_sigmoid))
    (heading,) = tree.headings
    assert "VANISHING" in heading and "examples/deep_sigmoid.py" in heading
    (table,) = tree.tables
    assert table[0] == ["#", "module", "op", "act RMS", "grad RMS", "layer grad"]
    assert all(len(row) == 6 for row in table)
    assert len(table) == 1 + 2 * markdown.EDGE_ROWS + 1  # header, both ends, the "more" row
    assert [row[0] for row in table[1:3]] == ["1", "2"] and table[-1][0] == "31"
    assert float(table[-1][4]) == pytest.approx(deep_sigmoid.layers[-1].predicted.grad_rms, rel=0.01)
    fixes = [f.fix for f in deep_sigmoid.findings if f.fix]
    assert fixes and all(any(fix in block for block in tree.code) for fix in fixes)
    assert any("layer = nn.Linear(WIDTH, WIDTH)" in block for block in tree.code)  # the source line
    assert {f"https://github.com/gradaudit/gradaudit/blob/main/rules/{f.rule}.md" for f in deep_sigmoid.findings} <= set(
        tree.links
    )


def test_messages_render_as_plain_text(deep_sigmoid):
    html = gfm(markdown.render(deep_sigmoid))
    ga101 = next(f for f in deep_sigmoid.findings if f.rule == "GA101")
    assert ga101.message.replace("'", "&#x27;") in html or ga101.message in _text(html)


def _text(html: str) -> str:
    from html import unescape

    return unescape(re.sub(r"<[^>]+>", "", html))


class Awkward(nn.Module):
    """Module names with a pipe, backticks, HTML and emphasis characters."""

    NAMES = ("a|b", "x`y``z", "<script>alert(1)</script>", "*bold*_u_")

    def __init__(self) -> None:
        super().__init__()
        for name in self.NAMES:
            self.add_module(name, nn.Linear(8, 8))

    def forward(self, x):
        for name in self.NAMES:
            x = torch.tanh(getattr(self, name)(x))
        return x


def test_user_strings_cannot_break_the_table_or_inject_html():
    report = gradaudit.audit(Awkward(), torch.randn(4, 8), target="awk|ward`.py")
    text = markdown.render(report)
    tree = parse(text)
    (table,) = tree.tables
    width = len(table[0])
    assert all(len(row) == width for row in table)
    assert [row[1] for row in table[1:]] == list(Awkward.NAMES)  # verbatim, inside code
    assert "script" not in tree.tags
    assert any("awk|ward`.py" in h for h in tree.headings)


@pytest.mark.parametrize(
    "raw",
    ["-5 decades", "1. item", "# heading", "a | b", "<b>x</b>", "*e* _u_ ~~s~~", "[l](http://x)", "&amp; `c`", "x\ny"],
)
def test_text_renders_verbatim(raw):
    html = gfm(markdown.text(raw))
    assert html.startswith("<p>") and html.count("<") == 2  # one paragraph, no other element
    assert _text(html).strip() == " ".join(raw.split())


def test_several_targets_in_one_document(deep_sigmoid):
    healthy = gradaudit.audit(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8),
                              target="ok.py")
    tree = parse(markdown.render_many([deep_sigmoid, healthy]))
    assert len(tree.headings) == 3 and "2 targets" in tree.headings[0]
    assert any("HEALTHY" in h for h in tree.headings) and len(tree.tables) == 2


def test_probe_columns_and_which_loss(tmp_path):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    report = gradaudit.audit(model, loss_fn=lambda out, b: F.cross_entropy(out, b[1]), batch=batch, draws=1)
    text = markdown.render(report)
    (table,) = parse(text).tables
    assert table[0][-3:] == ["measured act", "measured grad", "loss grad"]
    assert "your loss" in _text(gfm(text))


def test_cli_markdown_to_stdout(cli):
    res = cli("check", ROOT / "examples" / "deep_sigmoid.py", "--format", "markdown", "-q")
    assert res.exit_code == 1
    assert res.stdout.startswith("## :x: gradaudit: VANISHING") and "GA101" in res.stdout


def test_deep_sigmoid_markdown_gold(deep_sigmoid, monkeypatch):
    monkeypatch.chdir(ROOT)
    got = markdown.render(deep_sigmoid)
    if UPDATE:
        GOLD.write_text(got, encoding="utf-8")
    assert GOLD.is_file(), "no gold file: run GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_markdown.py"
    diff = difference(got, GOLD.read_text(encoding="utf-8"))
    assert diff is None, f"{GOLD.name}: {diff}; if intended: GRADAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_markdown.py"
