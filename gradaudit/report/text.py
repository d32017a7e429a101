"""Terminal output (rich): verdict first, then findings with their source line and fix,
then the per-layer table of predicted (and measured) activation and gradient RMS.

Colour follows the console: none when the stream is not a terminal or ``NO_COLOR`` is
set. :func:`render` gives the same text without colour, for ``-o FILE``.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any

from gradaudit.report.common import headline
from gradaudit.rules.base import SEVERITIES

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from gradaudit.report.model import AuditReport

#: Width used when the stream is not a terminal (files, pipes, CI logs).
PLAIN_WIDTH = 120
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_PLURAL = {"error": "errors", "warning": "warnings", "info": "info"}


def make_console(stream: Any, *, color: bool | None = None) -> Console:
    """A rich console on ``stream``: colour only on a terminal without ``NO_COLOR``."""
    from rich.console import Console

    is_tty = hasattr(stream, "isatty") and stream.isatty()
    no_color = bool(os.environ.get("NO_COLOR")) or not is_tty if color is None else not color
    width = None if is_tty else int(os.environ.get("COLUMNS", PLAIN_WIDTH))
    return Console(
        file=stream,
        no_color=no_color,
        color_system=None if no_color else "auto",
        force_terminal=is_tty and not no_color,
        width=width,
        highlight=False,
        soft_wrap=False,
        emoji=False,
    )


def fmt(x: Any) -> str:
    """Three significant digits; inf / nan / strings pass through."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    return f"{x:.3g}"


def print_report(report: AuditReport, console: Console, *, layers: bool = True, title: bool = False) -> None:
    """Print ``report``: verdict, findings, and (when ``layers``) the per-layer table."""
    from rich.markup import escape
    from rich.table import Table

    if title:
        console.rule(escape(report.target), style="dim")
    head = headline(report)
    style = "bold green" if head.label == "HEALTHY" else _STYLE.get(head.severity or "error", "bold")
    console.print(f"[{style}]{escape(head.label)}[/]  {escape(head.sentence)}", soft_wrap=True)
    counts = report.counts()
    if report.findings:
        parts = [f"{counts[s]} {_PLURAL[s] if counts[s] != 1 else s}" for s in SEVERITIES if counts[s]]
        console.print(f"{escape(report.target)}: " + ", ".join(parts))
    if report.baselined:
        console.print(f"[dim]{len(report.baselined)} known finding(s) held by the baseline are not listed[/]")
    for severity in SEVERITIES:
        group = [f for f in report.findings if f.severity == severity]
        if not group:
            continue
        console.print()
        console.print(f"[{_STYLE[severity]}]{_PLURAL[severity]} ({len(group)})[/]")
        for f in group:
            where = _where(f.location, f.module or f.node, report.target)
            console.print(
                f"  {escape(where)}: [{_STYLE[severity]}]{f.rule}[/] [dim]{f.name}[/] {escape(f.message)}",
                soft_wrap=True,
            )
            if f.fix:
                console.print(f"      fix: [bold]{escape(f.fix)}[/]", soft_wrap=True)
    if layers and report.layers:
        measured = any(layer.measured is not None for layer in report.layers)
        table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
        table.add_column("#", justify="right")
        table.add_column("module")
        table.add_column("op")
        table.add_column("act RMS", justify="right")
        table.add_column("grad RMS", justify="right")
        table.add_column("layer grad", justify="right")
        if measured:
            table.add_column("measured act", justify="right")
            table.add_column("measured grad", justify="right")
            table.add_column("measured layer grad", justify="right")
        user_loss = any("loss_grad_rms" in layer.extra for layer in report.layers)
        if user_loss:
            table.add_column("loss grad", justify="right")
        for layer in report.layers:
            name = layer.module or layer.node
            row = [
                str(layer.depth) if layer.depth is not None else "",
                escape(name) + (" *" if layer.estimated else ""),
                escape(layer.op),
                fmt(layer.predicted.act_rms),
                fmt(layer.predicted.grad_rms),
                fmt(layer.predicted.layer_grad) if layer.predicted.layer_grad is not None else "",
            ]
            if measured:
                m = layer.measured
                row += [fmt(m.act_rms) if m else "-", fmt(m.grad_rms) if m else "-",
                        fmt(m.layer_grad) if m and m.layer_grad is not None else ""]
            if user_loss:
                row.append(fmt(layer.extra.get("loss_grad_rms")))
            table.add_row(*row)
        console.print()
        console.print(
            "[bold]per layer[/] (predicted RMS of the output and of dL/d(output); layer grad = sqrt(P) x grad RMS, "
            "P positions sharing each weight: the weight-gradient scale the verdict reads; # = weight-layer depth)",
            soft_wrap=True,
        )
        console.print(table)
        if measured:
            console.print(escape(losses_used(report)), soft_wrap=True)
    if report.over_time:
        _print_over_time(report, console)
    estimated = [e for e in report.estimated_ops if e.get("ok")]
    failed = [e for e in report.estimated_ops if not e.get("ok")]
    if estimated:
        ops = sorted({f"{e['op']} ({e['function']})" if e.get("function") else str(e.get("op")) for e in estimated})
        console.print()
        console.print(
            f"* {len(estimated)} op(s) without a handler were estimated by local Monte Carlo: " + escape(", ".join(ops))
        )
    if failed:
        console.print()
        console.print(
            f"{len(failed)} op(s) could be neither modelled nor sampled (no statistics past them): "
            + escape(", ".join(f"{e.get('node')} [{e.get('op')}]" for e in failed))
        )
    shapes = ", ".join(describe_input(x) for x in report.inputs)
    console.print()
    console.print(f"[dim]inputs: {escape(shapes)} ({escape(report.input_source)}); frontend: {report.frontend}[/]")
    for note in report.capture_notes:
        console.print(f"[dim]  {escape(note)}[/]", soft_wrap=True)


def losses_used(report: AuditReport) -> str:
    """Which loss each column of the per-layer table used."""
    probe = report.probe or {}
    text = f"predicted and measured: {probe.get('synthetic_loss') or 'L = sum <y, g>, g ~ N(0, 1)'}"
    loss = probe.get("loss")
    if isinstance(loss, dict):
        text += f"; loss grad: RMS of d {loss.get('name')}(output, batch)/d(output), your loss"
    return text


def _print_over_time(report: AuditReport, console: Console) -> None:
    """Per recurrent module or loop: the per-step gain and horizon, the gates, and the
    predicted and measured curves at a few steps back."""
    from rich.markup import escape
    from rich.table import Table

    from gradaudit.report import over_time as words

    console.print()
    console.print(
        "[bold]over time[/] (RMS of dL/dx_t for a loss on the last step only, relative to that step; "
        "steps back = T - 1 - t)",
        soft_wrap=True,
    )
    for record in report.over_time:
        console.print(f"  {escape(words.title(record))}: {words.gain_text(record)}; {escape(words.horizons_text(record))}",
                      soft_wrap=True)
        console.print(f"    {escape(words.hidden_text(record))}", soft_wrap=True)
        console.print(f"    {escape(words.gates_text(record))}", soft_wrap=True)
        lags, predicted, measured = words.columns(record)
        table = Table(show_edge=False, pad_edge=False, box=None, show_header=False, padding=(0, 1))
        table.add_column(justify="left")
        for _ in lags:
            table.add_column(justify="right")
        table.add_row("    steps back", *(str(k) for k in lags))
        table.add_row("    predicted", *predicted)
        if measured is not None:
            table.add_row("    measured", *measured)
        console.print(table)


def render(report: AuditReport, **_: object) -> str:
    """The terminal report as plain text (no colour), for ``-o FILE``."""
    buf = io.StringIO()
    print_report(report, make_console(buf, color=False))
    return buf.getvalue()


def render_many(reports: list[AuditReport], **_: object) -> str:
    buf = io.StringIO()
    console = make_console(buf, color=False)
    for i, report in enumerate(reports):
        if i:
            console.print()
        print_report(report, console, title=len(reports) > 1)
    return buf.getvalue()


def describe_input(x: dict) -> str:
    name = f"{x['name']}=" if "name" in x else ""
    if "shape" in x:
        return name + "x".join(str(d) for d in x["shape"]) + f" {x.get('dtype', '')}".rstrip()
    return name + str(x.get("value", x))


def _where(location: dict | None, name: str | None, target: str) -> str:
    if location:
        return f"{location['path']}:{location['line']}"
    path = target.split(".py:")[0] + ".py" if ".py:" in target else target
    return f"{path} [{name}]" if name else path
