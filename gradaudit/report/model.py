"""The report data tree: built once by the audit, formatted by each renderer.

Renderers (text, json, sarif, github, html) only format an :class:`AuditReport`; they
never compute. ``AuditReport.to_json()`` is the public JSON contract
(``format_version`` 1) that other tools rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import ConfigError
from gradaudit.propagation.depth import DepthSummary
from gradaudit.rules.base import SEVERITY_ORDER, Finding

FORMAT_VERSION = 1
#: The verdict of an audit whose statistics do not cover every parameterized layer (or
#: whose loss reaches no parameter): never ``healthy``.
INCOMPLETE = "incomplete"
#: Exit status of an incomplete audit on the command line.
INCOMPLETE_EXIT = 4


class FindingsError(Exception):
    """Raised by :meth:`AuditReport.raise_for_findings`; ``report`` is the audit's report
    and the message is its text rendering."""

    def __init__(self, report: "AuditReport", fail_on: str) -> None:
        from gradaudit.report.text import render

        self.report = report
        self.fail_on = fail_on
        super().__init__(render(report))


def check_fail_on(fail_on: str) -> int:
    """The severity rank of ``fail_on``; :class:`ConfigError` for an unknown one."""
    if fail_on not in SEVERITY_ORDER:
        raise ConfigError(f"fail_on must be one of error, warning, info (got {fail_on!r})")
    return SEVERITY_ORDER[fail_on]


@dataclass
class Moments:
    """RMS of a layer's output and of dL/d(output); for weight layers also the layer
    gradient, sqrt(P) x grad_rms (:func:`gradaudit.propagation.depth.layer_gradient`)."""

    act_rms: float
    grad_rms: float
    layer_grad: float | None = None

    def to_json(self) -> dict:
        out = {"act_rms": _num(self.act_rms), "grad_rms": _num(self.grad_rms)}
        if self.layer_grad is not None:
            out["layer_grad"] = _num(self.layer_grad)
        return out


@dataclass
class LayerRecord:
    """One row of the per-layer table."""

    node: str
    module: str | None
    op: str
    module_type: str | None
    predicted: Moments
    measured: Moments | None = None
    depth: int | None = None
    estimated: bool = False
    location: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "node": self.node,
            "module": self.module,
            "op": self.op,
            "module_type": self.module_type,
            "depth": self.depth,
            "estimated": self.estimated,
            "location": self.location,
            "predicted": self.predicted.to_json(),
            "measured": self.measured.to_json() if self.measured else None,
        }
        out.update(self.extra)
        return out


@dataclass
class AuditReport:
    """Everything one audit found; renderers only format it.

    ``verdict`` is ``healthy``, ``incomplete`` (the statistics do not cover the model:
    see ``coverage``) or the category of the worst finding. ``ok(fail_on)`` says whether
    the audit passes a gate; :meth:`raise_for_findings` raises :class:`FindingsError`
    when it does not.
    """

    target: str
    frontend: str
    input_source: str
    inputs: list[dict]
    findings: list[Finding]
    layers: list[LayerRecord]
    depth: DepthSummary
    estimated_ops: list[dict] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None
    gradcheck: list[dict] = field(default_factory=list)
    suppressed: list[dict] = field(default_factory=list)
    #: One line each: why a cheaper capture failed, outputs left out of L.
    capture_notes: list[str] = field(default_factory=list)
    #: :class:`~gradaudit.propagation.coverage.Coverage` of the prediction.
    coverage: Any = None
    #: The profile the vanishing/exploding rules judged: ``(source, DepthSummary)`` with
    #: source ``predicted``, ``measured`` or ``predicted with closed gates opened``.
    judged: tuple[str, DepthSummary] | None = None
    #: How many of the weight layers that train a normalization follows (their scale is
    #: reset: a large gradient there corrects itself; see GA102).
    normalized_layers: int = 0
    #: How many weight layers are frozen (every parameter ``requires_grad=False``): they
    #: pass gradients on, and the vanishing/exploding rules judge the others.
    frozen_layers: int = 0
    #: The gradient over time of every recurrent module call and unrolled loop
    #: (:class:`gradaudit.propagation.over_time.OverTime`: the predicted curve and, when
    #: the probe ran, the measured one).
    over_time: list[Any] = field(default_factory=list)
    #: Findings a baseline already holds (:mod:`gradaudit.baseline`): not in ``findings``,
    #: so they neither fail a gate nor show as new, but the verdict still counts them.
    baselined: list[Finding] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the prediction put finite statistics on every parameterized layer."""
        return self.coverage is None or self.coverage.complete

    @property
    def verdict(self) -> str:
        """``healthy``, ``incomplete`` or the category of the worst finding.

        When the statistics do not cover the model the verdict is ``incomplete``: the
        predicted findings rest on partial (or non-finite) numbers. Only an error-level
        finding of a *measured* stage (the probe, the gradcheck) outranks it. Otherwise
        the worst finding's category, ``healthy`` without any (info findings never
        change the verdict; findings held by a baseline count: a known problem is still
        a problem).
        """
        ranked = sorted((f for f in self.findings + self.baselined if f.severity != "info"),
                        key=lambda f: (SEVERITY_ORDER[f.severity], f.rule))
        if not self.complete:
            from gradaudit.rules.base import all_rules

            rules = all_rules()
            measured = [f for f in ranked if f.severity == "error" and f.rule in rules
                        and rules[f.rule].stage in ("probe", "gradcheck")]
            return measured[0].category if measured else INCOMPLETE
        return ranked[0].category if ranked else "healthy"

    def worst_severity(self) -> str | None:
        if not self.findings and not self.baselined:
            return None
        return min((f.severity for f in self.findings + self.baselined), key=SEVERITY_ORDER.__getitem__)

    def ok(self, fail_on: str = "error") -> bool:
        """True when the audit is complete and no finding is at or above ``fail_on``."""
        limit = check_fail_on(fail_on)
        return self.complete and not any(SEVERITY_ORDER[f.severity] <= limit for f in self.findings)

    def exit_code(self, fail_on: str = "error") -> int:
        """The command line's exit status: 4 when the verdict is ``incomplete``, else 1
        when a finding is at or above ``fail_on``, else 0."""
        limit = check_fail_on(fail_on)
        if self.verdict == INCOMPLETE:
            return INCOMPLETE_EXIT
        return 1 if any(SEVERITY_ORDER[f.severity] <= limit for f in self.findings) else 0

    def raise_for_findings(self, fail_on: str = "error") -> "AuditReport":
        """Raise :class:`FindingsError` unless :meth:`ok`; return ``self`` otherwise."""
        if not self.ok(fail_on):
            raise FindingsError(self, fail_on)
        return self

    def to_sarif(self) -> dict:
        """The SARIF 2.1.0 log of this report, as a dict."""
        import json

        from gradaudit.report import sarif

        return json.loads(sarif.render(self))

    def to_html(self, path: str | None = None) -> str:
        """The self-contained HTML report; written to ``path`` too when given."""
        from gradaudit.report import html

        text = html.render(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def counts(self) -> dict[str, int]:
        out = {"error": 0, "warning": 0, "info": 0}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "frontend": self.frontend,
            "capture_notes": self.capture_notes,
            "input_source": self.input_source,
            "inputs": self.inputs,
            "summary": {
                "verdict": self.verdict,
                "counts": self.counts(),
                "coverage": self.coverage.to_json() if self.coverage is not None else None,
                "gradient_spread_decades": _num(self.depth.spread_decades),
                "depth": self.depth.to_json(),
                "judged": None if self.judged is None else {"source": self.judged[0], **self.judged[1].to_json()},
                "frozen_layers": self.frozen_layers,
            },
            "findings": [f.to_json() for f in self.findings],
            "layers": [layer.to_json() for layer in self.layers],
            "over_time": [record.to_json() for record in self.over_time],
            "estimated_ops": self.estimated_ops,
            "probe": self.probe,
            "gradcheck": self.gradcheck,
            "suppressed": self.suppressed,
            "environment": self.environment,
        }


def _num(x: Any) -> Any:
    """JSON has no inf/nan: map them to strings a reader can still recognise."""
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x in (float("inf"), float("-inf")):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.6g}")
    return x
