"""The HTML report (``--format html -o audit.html``): one self-contained page.

Inline CSS, an inline SVG chart (geometry from :mod:`gradaudit.report.charts`, drawn by
``templates/depth_chart.svg.j2``; no plotting library), no scripts, no fonts, no network
references: it opens offline from disk in any browser. jinja2 is the only dependency.
Jinja2 renders it with autoescaping on, because module names, messages and source lines
come from user code. Dark mode follows ``prefers-color-scheme``.

Order of the page: verdict and the sentence that matters; findings by severity (source
line, numbers, fix as code); the depth chart; the gradcheck table; ops whose statistics
were estimated; per-layer table; environment.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gradaudit.report.common import SEVERITY_TITLES, fmt_num, headline, rule_url, severity_words, source_line

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

def render(report: AuditReport, **opts: Any) -> str:
    """The report as one HTML document (text)."""
    import jinja2

    from gradaudit.report.charts import depth_chart

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradaudit.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["num"] = fmt_num
    env.filters["u"] = _user_units
    template = env.get_template("report.html.j2")
    return template.render(
        r=report,
        head=headline(report),
        groups=_groups(report),
        chart=depth_chart(report),
        trend=trend(report.depth),
        severity_words=severity_words,
        gradcheck=_gradcheck(report.gradcheck),
        probe=_probe(report.probe) if report.probe else None,
        layers=report.layers,
        environment=_environment(report),
        suppressed=report.suppressed,
        counts=report.counts(),
        depth=report.depth,
        over_time=_over_time(report),
    )


def trend(d) -> str:
    """The chart caption's fitted trend, in weight layers. A rate is only stated when the
    gradient changes 10x within the model's own depth: a trend that would need more layers
    than the model has is not extrapolated."""
    if d.n_layers < 2 or not math.isfinite(d.decades_per_layer):
        return ""
    lpd = d.layers_per_decade
    if lpd is not None and lpd <= d.n_layers:
        return f"Fitted trend: the gradient changes 10\u00d7 every {fmt_num(lpd)} weight layers."
    return f"Fitted trend: the gradient changes less than 10\u00d7 across the {d.n_layers} weight layers."


def _over_time(report: AuditReport) -> list[dict]:
    """Per recurrent record: title, words, the chart's geometry and the curves at a few
    steps back (:mod:`gradaudit.report.over_time`, :mod:`gradaudit.report.time_chart`)."""
    from gradaudit.report import over_time as words
    from gradaudit.report.time_chart import time_chart

    out = []
    for record in report.over_time:
        lags, predicted, measured = words.columns(record)
        out.append({
            "title": words.title(record),
            "gain": words.gain_text(record),
            "horizon": words.horizons_text(record),
            "hidden": words.hidden_text(record),
            "gates": words.gates_text(record, every=True),
            "chart": time_chart(record),
            "lags": lags,
            "predicted": predicted,
            "measured": measured,
        })
    return out




def _user_units(v: float) -> str:
    """A coordinate of the chart: one decimal, no trailing zeros."""
    return f"{round(float(v), 1):g}"


def _groups(report: AuditReport) -> list[dict]:
    from gradaudit.rules.base import all_rules
    from gradaudit.rules.evidence.text import module_expr

    rules = all_rules()
    out = []
    for sev in ("error", "warning", "info"):
        items = []
        for f in report.findings:
            if f.severity != sev:
                continue
            items.append(
                {
                    "f": f,
                    "source": source_line(f.location),
                    "numbers": [(k, _value(v)) for k, v in (f.data or {}).items()],
                    "url": rule_url(f.rule),
                    "module": module_expr(f.module) if f.module else None,
                    "summary": rules[f.rule].summary() if f.rule in rules else "",
                }
            )
        if items:
            out.append({"severity": sev, "title": SEVERITY_TITLES[sev], "items": items})
    return out


def _gradcheck(rows: list[dict]) -> dict | None:
    """The gradcheck table: one row per checked target, the worst entry spelled out.

    Known keys (``target``, ``kind``, ``grade``, ``max_rel_error``, ``checked``,
    ``worst``, ``kink_count``, ``below_resolution``, ``nonfinite``, ``location``, ``note``) get their own
    columns in that order; any other scalar keys follow."""
    if not rows:
        return None
    known = ("target", "kind", "grade", "max_rel_error", "checked", "worst", "kink_count", "below_resolution",
             "nonfinite", "location", "note")
    skip = {"kinks", "input_shapes"}
    extra: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in known and k not in skip and k not in extra and not isinstance(v, (list, dict)):
                extra.append(k)
    cols = [k for k in known if any(k in row for row in rows)] + extra
    out = []
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            if c == "worst":
                cells.append(_worst(v))
            elif c == "location":
                cells.append(f"{v.get('path')}:{v.get('line')}" if isinstance(v, dict) else "")
            elif v is None:
                cells.append("")
            else:
                cells.append(_value(v))
        out.append(cells)
    titles = {"max_rel_error": "max rel. error", "kink_count": "kinks", "below_resolution": "below resolution",
              "nonfinite": "non-finite", "worst": "worst entry"}
    return {"cols": [titles.get(c, c) for c in cols], "rows": out}


def _worst(entries: Any) -> str:
    if not entries or not isinstance(entries, list) or not isinstance(entries[0], dict):
        return _value(entries) if entries else ""
    e = entries[0]
    index = e.get("index")
    where = f"{e.get('tensor', '')}{list(index) if isinstance(index, (list, tuple)) else ''}"
    return f"{where}: autograd {fmt_num(e.get('autograd'))} vs numeric {fmt_num(e.get('numeric'))}"


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
        more = f" (+{len(v) - 1} more)" if len(v) > 1 else ""
        return _value(v[0]) + more
    if isinstance(v, (list, tuple)):
        shown = ", ".join(_value(x) for x in list(v)[:8])
        return f"[{shown}{', …' if len(v) > 8 else ''}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in list(v.items())[:8]) + "}"
    return fmt_num(v)


def _probe(d: dict) -> list[tuple[str, str]]:
    """Rows of the probe summary: what ran, how well prediction and measurement agree,
    where values stopped being finite. Per-layer numbers are in the layers table."""
    rows: list[tuple[str, str]] = []
    shown = {"agreement", "units", "agreement_summary", "notes", "inputs", "nonfinite", "grad_norms", "precision",
             "loss", "synthetic_loss"}
    names = {"draws": "draws", "device": "device", "dtype": "dtype", "total_grad_norm": "total gradient norm",
             "seconds_per_draw": "seconds per draw"}
    if d.get("synthetic_loss"):
        rows.append(("loss of the prediction and of the measured columns", str(d["synthetic_loss"])))
    loss = d.get("loss")
    if isinstance(loss, dict):
        clip = loss.get("clip") or {}
        rows.append(("your loss", f"{loss.get('name')}(output, batch) on {loss.get('batches')} batch(es): "
                                  f"loss {_value(loss.get('values'))}"))
        rows.append(("global gradient norm of your loss", _value(loss.get("grad_norms"))))
        if clip:
            rows.append(("clipping", f"clip_grad_norm_ max_norm {fmt_num(clip.get('max_norm'))}, "
                                     f"clipvalue {fmt_num(clip.get('clip_value'))}"))
    for key, label in names.items():
        if d.get(key) is not None:
            rows.append((label, _value(d[key])))
    if d.get("grad_norms"):
        rows.append(("gradient norm per draw", _value(d["grad_norms"])))
    summary = d.get("agreement_summary") or {}
    parts = []
    for key, what in (("fraction_act_within_2x", "activations"), ("fraction_grad_within_2x", "gradients")):
        if isinstance(summary.get(key), (int, float)):
            parts.append(f"{what} {100 * summary[key]:.0f}%")
    if parts:
        rows.append(("prediction within 2x of measurement", f"{', '.join(parts)} of {summary.get('layers', '?')} layers"))
    for item in d.get("inputs") or []:
        if isinstance(item, dict) and "measured_rms" in item:
            rows.append((f"input {item.get('input', '')}",
                         f"measured RMS {fmt_num(item['measured_rms'])}, prediction assumed {fmt_num(item.get('predicted_rms'))}"))
    bad = d.get("nonfinite")
    if isinstance(bad, dict):
        where = bad.get("module") or bad.get("node")
        loc = bad.get("location")
        at = f" at {loc.get('path')}:{loc.get('line')}" if isinstance(loc, dict) else ""
        rows.append(("first non-finite value", f"{bad.get('value')} in the {bad.get('phase')} pass of {bad.get('op')} "
                                               f"'{where}'{at} ({bad.get('cause')})"))
    if isinstance(d.get("precision"), dict):
        rows.extend((f"precision: {k}", _value(v)) for k, v in d["precision"].items())
    if d.get("notes"):
        rows.append(("notes", "; ".join(str(n) for n in d["notes"])))
    rows.extend((k, _value(v)) for k, v in d.items() if k not in names and k not in shown)
    return rows


def _environment(report: AuditReport) -> list[tuple[str, str]]:
    env = dict(report.environment)
    rows: list[tuple[str, str]] = []
    for key in ("gradaudit", "torch", "python", "device", "dtype"):
        if key in env:
            rows.append((key, str(env.pop(key))))
    rows.append(("frontend", "; ".join([report.frontend, *report.capture_notes])))
    rows.append(("input source", report.input_source))
    if report.inputs:
        rows.append(("inputs", "; ".join(_describe(x) for x in report.inputs)))
    seconds = {k: v for k, v in env.items() if k.endswith("_seconds") and isinstance(v, (int, float))}
    for k in seconds:
        env.pop(k)
    if seconds:
        total = sum(seconds.values())
        parts = ", ".join(f"{k.removesuffix('_seconds')} {v:.2f} s" for k, v in seconds.items())
        rows.append(("time taken", f"{total:.2f} s ({parts})" if len(seconds) > 1 else f"{total:.2f} s"))
    rows.extend((k, _value(v)) for k, v in env.items())
    return rows


def _describe(x: dict) -> str:
    name = f"{x['name']}=" if "name" in x else ""
    if "shape" in x:
        return f"{name}{x.get('dtype', '')}[{', '.join(str(s) for s in x['shape'])}]"
    return name + str(x.get("value", x))
