"""``gradaudit compare`` output: a :class:`~gradaudit.compare.Comparison` as text, JSON
or GitHub-flavoured Markdown (renderers only format it)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gradaudit.report.common import fmt_num
from gradaudit.report.json import finite

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.compare import Comparison

FORMATS = ("text", "json", "markdown")


def render(cmp: Comparison, fmt: str) -> str:
    return {"text": render_text, "json": render_json, "markdown": render_markdown}[fmt](cmp)


def render_json(cmp: Comparison) -> str:
    return json.dumps(finite(cmp.to_json()), indent=2, allow_nan=False) + "\n"


def _change(ratio: float | None) -> str:
    return "-" if ratio is None else f"x{fmt_num(ratio)}"


def _finding_line(f: dict) -> str:
    where = f.get("module") or f.get("node") or "model"
    return f"{f['rule']} {f.get('name', '')} [{where}] {f['severity']}: {f.get('message', '')}"


def _spread(cmp: Comparison) -> tuple[object, object]:
    return cmp.base["summary"].get("gradient_spread_decades"), cmp.new["summary"].get("gradient_spread_decades")


def render_text(cmp: Comparison) -> str:
    lines = [
        f"verdict: {cmp.base_verdict.upper()} -> {cmp.new_verdict.upper()}",
        f"  base: {cmp.base_label}",
        f"  new:  {cmp.new_label}",
    ]
    for title, group in (("findings gone", cmp.gone), ("findings added", cmp.added)):
        lines += ["", f"{title} ({len(group)})"]
        lines += [f"  {_finding_line(f)}" for f in group]
    if cmp.kept:
        lines += ["", f"findings in both ({len(cmp.kept)})"]
        for b, n in cmp.kept:
            moved = "" if (b.get("module") == n.get("module")) else f" (was at [{b.get('module') or b.get('node')}])"
            sev = "" if b["severity"] == n["severity"] else f" (was {b['severity']})"
            lines.append(f"  {_finding_line(n)}{moved}{sev}")
    base_spread, new_spread = _spread(cmp)
    lines += ["", f"predicted gradient spread across layers: {fmt_num(base_spread)} -> {fmt_num(new_spread)} decades"]
    if cmp.layers:
        head = ("#", "layer", "op", "base grad RMS", "new grad RMS", "change", "base act RMS", "new act RMS")
        rows = [
            (str(r["depth"] or ""), r["layer"], str(r["op"]), fmt_num(r["base_grad_rms"]), fmt_num(r["new_grad_rms"]),
             _change(r["grad_ratio"]), fmt_num(r["base_act_rms"]), fmt_num(r["new_act_rms"]))
            for r in cmp.layers
        ]
        widths = [max(len(c) for c in col) for col in zip(head, *rows)]
        lines += ["", "per layer (predicted RMS of dL/d(output) and of the output, base -> new)"]
        for row in (head, *rows):
            cells = [c.rjust(w) if i in (0, 3, 4, 5, 6, 7) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
    for title, names in (("layers only in base", cmp.only_base), ("layers only in new", cmp.only_new)):
        if names:
            lines += ["", f"{title}: {', '.join(names)}"]
    return "\n".join(lines) + "\n"


def render_markdown(cmp: Comparison) -> str:
    from gradaudit.report.markdown import EDGE_ROWS, code_span, text

    lines = [
        f"## gradaudit compare: {text(cmp.base_verdict.upper())} → {text(cmp.new_verdict.upper())}",
        "",
        f"base {code_span(cmp.base_label)}, new {code_span(cmp.new_label)}",
    ]
    for title, group, icon in (("gone", cmp.gone, ":heavy_check_mark:"), ("added", cmp.added, ":x:")):
        lines += ["", f"**{len(group)} finding(s) {title}**"]
        if group:
            lines.append("")
            lines += [f"- {icon} {text(_finding_line(f))}" for f in group]
    if cmp.kept:
        lines += ["", f"<details><summary>{len(cmp.kept)} finding(s) in both</summary>", ""]
        lines += [f"- {text(_finding_line(n))}" for _, n in cmp.kept]
        lines += ["", "</details>"]
    base_spread, new_spread = _spread(cmp)
    lines += ["", f"Predicted gradient spread across layers: {fmt_num(base_spread)} → {fmt_num(new_spread)} decades"]
    if cmp.layers:
        lines += ["", "| # | layer | op | base grad RMS | new grad RMS | change |", "| ---: | --- | --- | ---: | ---: | ---: |"]
        rows = cmp.layers
        shown: list = rows if len(rows) <= 2 * EDGE_ROWS else rows[:EDGE_ROWS] + [None] + rows[-EDGE_ROWS:]
        for r in shown:
            if r is None:
                lines.append(f"|  | … {len(rows) - 2 * EDGE_ROWS} more … |  |  |  |  |")
                continue
            lines.append(
                f"| {r['depth'] or ''} | {code_span(r['layer'], in_table=True)} | {text(r['op'])} | "
                f"{fmt_num(r['base_grad_rms'])} | {fmt_num(r['new_grad_rms'])} | {_change(r['grad_ratio'])} |"
            )
    return "\n".join(lines) + "\n"
