"""The report data tree: built once by the audit, formatted by each renderer.

Renderers (text, json, sarif, github, html) only format an :class:`AuditReport`; they
never compute. ``AuditReport.to_json()`` is the public JSON contract
(``format_version`` 1) that other tools rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradaudit.propagation.depth import DepthSummary
from gradaudit.rules.base import SEVERITY_ORDER, Finding

FORMAT_VERSION = 1


@dataclass
class Moments:
    """RMS of a layer's output and of dL/d(output)."""

    act_rms: float
    grad_rms: float

    def to_json(self) -> dict:
        return {"act_rms": _num(self.act_rms), "grad_rms": _num(self.grad_rms)}


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

    @property
    def verdict(self) -> str:
        if not self.findings:
            return "healthy"
        worst = min(self.findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.rule))
        if worst.severity == "info":
            return "healthy"
        return worst.category

    def worst_severity(self) -> str | None:
        if not self.findings:
            return None
        return min((f.severity for f in self.findings), key=SEVERITY_ORDER.__getitem__)

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
                "gradient_spread_decades": _num(self.depth.spread_decades),
                "depth": self.depth.to_json(),
            },
            "findings": [f.to_json() for f in self.findings],
            "layers": [layer.to_json() for layer in self.layers],
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
