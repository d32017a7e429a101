"""``--format markdown``: a compact report for a pull-request comment or a CI job summary
(``>> $GITHUB_STEP_SUMMARY``), in GitHub-flavoured Markdown.

Verdict first, then errors and warnings with their source line and fix as code, info
findings folded in a ``<details>`` block, then a small per-layer table (the first and last
layers). Text from the user's code (module names, source lines, messages) is escaped:
ASCII punctuation that Markdown or inline HTML would interpret gets a backslash
(CommonMark allows one before any ASCII punctuation), pipes in table cells are ``\\|``
(GFM's table rule, also inside code spans), and code is fenced with more backticks than
it contains.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from gradaudit.report.common import fmt_num, headline, rule_url, source_line, target_path
from gradaudit.report.text import describe_input, losses_used

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

#: Rows of the per-layer table: this many from each end when there are more.
EDGE_ROWS = 5
_ICON = {"error": ":x:", "warning": ":warning:", "info": ":information_source:"}
_PLURAL = {"error": "errors", "warning": "warnings", "info": "info"}
#: Characters escaped anywhere in running text: emphasis, code, links and images (an
#: escaped "[" opens none, so parentheses stay plain), inline HTML, entities, table cells,
#: strikethrough.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")
#: What would open a block at the start of a line: an ordered or bullet list item, a
#: heading, a setext underline or rule.
_BLOCK_START = re.compile(r"^(\d+)([.)])|^([#+=-])")


def text(value: object) -> str:
    """Running text: one line, Markdown and HTML characters backslash-escaped."""
    line = _SPECIAL.sub(r"\\\1", " ".join(str(value).split()))
    return _BLOCK_START.sub(lambda m: f"{m.group(1)}\\{m.group(2)}" if m.group(1) else f"\\{m.group(3)}", line)


def code_span(value: object, *, in_table: bool = False) -> str:
    """``value`` as inline code: delimiters longer than any backtick run inside; in a
    table, pipes escaped (GFM removes the backslash before the span is parsed)."""
    body = " ".join(str(value).split())
    run = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * (run + 1)
    if in_table:
        body = body.replace("|", "\\|")
    pad = " " if body.startswith("`") or body.endswith("`") or run else ""
    return f"{ticks}{pad}{body}{pad}{ticks}"


def code_block(value: str, lang: str = "python") -> str:
    """A fenced code block longer than any backtick fence inside ``value``."""
    run = max((len(m) for m in re.findall(r"`+", value)), default=0)
    fence = "`" * max(3, run + 1)
    return f"{fence}{lang}\n{value.rstrip()}\n{fence}"


def render(report: AuditReport, **_: object) -> str:
    return _report(report, level=2) + "\n"


def render_many(reports: Iterable[AuditReport], **_: object) -> str:
    reports = list(reports)
    if len(reports) == 1:
        return render(reports[0])
    verdicts = ", ".join(f"{code_span(r.target)} {r.verdict.upper()}" for r in reports)
    parts = [f"## gradaudit: {len(reports)} targets", "", verdicts]
    parts += ["", *(_report(r, level=3) for r in reports)]
    return "\n".join(parts).rstrip() + "\n"


def _report(report: AuditReport, *, level: int) -> str:
    head = headline(report)
    icon = {"HEALTHY": ":white_check_mark:", "INCOMPLETE": ":grey_question:"}.get(
        head.label, _ICON.get(head.severity or "error", ":x:"))
    lines = [f"{'#' * level} {icon} gradaudit: {text(head.label)} {code_span(report.target)}", ""]
    lines.append(f"**{text(head.sentence)}**")
    counts = report.counts()
    parts = [f"{counts[s]} {_PLURAL[s] if counts[s] != 1 else s}" for s in ("error", "warning", "info") if counts[s]]
    lines += ["", ", ".join(parts) if parts else "no findings"]
    if report.baselined:
        lines[-1] += f" ({len(report.baselined)} known finding(s) held by the baseline are not listed)"
    serious = [f for f in report.findings if f.severity != "info"]
    for f in serious:
        lines += ["", *_finding(f, report.target)]
    notes = [f for f in report.findings if f.severity == "info"]
    if notes:
        lines += ["", f"<details><summary>{len(notes)} info finding(s)</summary>"]
        for f in notes:
            lines += ["", *_finding(f, report.target)]
        lines += ["", "</details>"]
    if report.layers:
        lines += ["", *_layers(report)]
    shapes = ", ".join(describe_input(x) for x in report.inputs)
    lines += ["", f"<sub>inputs: {text(shapes)} ({text(report.input_source)}); frontend: {text(report.frontend)}</sub>"]
    return "\n".join(lines)


def _finding(f, target: str) -> list[str]:
    where = _where(f.location, target)
    module = f" in {code_span(f.module)}" if f.module else ""
    lines = [
        f"{_ICON[f.severity]} **[{f.rule}]({rule_url(f.rule)})** {text(f.name)} at {code_span(where)}{module}",
        "",
        text(f.message),
    ]
    src = source_line(f.location)
    if src:
        lines += ["", code_block(src)]
    if f.fix:
        lines += ["", "Fix:", "", code_block(f.fix)]
    return lines


def _layers(report: AuditReport) -> list[str]:
    rows = report.layers
    measured = any(layer.measured is not None for layer in rows)
    loss = any("loss_grad_rms" in layer.extra for layer in rows)
    head = ["#", "module", "op", "act RMS", "grad RMS", "layer grad"]
    if measured:
        head += ["measured act", "measured grad"]
    if loss:
        head += ["loss grad"]
    align = ["---:", "---", "---", *(["---:"] * (len(head) - 3))]
    out = [
        "<details><summary>per layer: predicted RMS of the output and of dL/d(output); layer grad = sqrt(P) x grad "
        "RMS, P positions sharing each weight</summary>",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(align) + " |",
    ]
    shown = list(enumerate(rows))
    if len(rows) > 2 * EDGE_ROWS:
        shown = shown[:EDGE_ROWS] + [(-1, None)] + shown[-EDGE_ROWS:]
    for _, layer in shown:
        if layer is None:
            left = len(rows) - 2 * EDGE_ROWS
            out.append("| " + " | ".join([""] + [f"… {left} more …"] + [""] * (len(head) - 2)) + " |")
            continue
        name = layer.module or layer.node
        row = [
            str(layer.depth) if layer.depth is not None else "",
            code_span(name, in_table=True) + (" \\*" if layer.estimated else ""),
            text(layer.op),
            fmt_num(layer.predicted.act_rms),
            fmt_num(layer.predicted.grad_rms),
            fmt_num(layer.predicted.layer_grad) if layer.predicted.layer_grad is not None else "",
        ]
        if measured:
            m = layer.measured
            row += [fmt_num(m.act_rms) if m else "", fmt_num(m.grad_rms) if m else ""]
        if loss:
            row.append(fmt_num(layer.extra.get("loss_grad_rms")) if "loss_grad_rms" in layer.extra else "")
        out.append("| " + " | ".join(row) + " |")
    if measured:
        out += ["", text(losses_used(report))]
    out += ["", "</details>"]
    return out


def _where(location: dict | None, target: str) -> str:
    if location:
        return f"{location['path']}:{location['line']}"
    return target_path(target) or target
