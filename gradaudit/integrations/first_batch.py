"""What the framework callbacks share: audit the model on the first training batch, turn
the report into logger metrics, write the HTML report, decide whether to stop.

The audit runs under :func:`gradaudit.state.preserved` like every audit, so the model,
its ``.grad`` and the RNG states are as found when training goes on: the run trains
exactly as it would have without the callback.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from gradaudit.report.model import check_fail_on

PREFIX = "gradaudit"


class FirstBatchAudit:
    """The options and the audit both callbacks share (mixed into each framework's
    callback class): ``loss_fn(output, batch)`` for the probe (None: the synthetic loss
    only, with ``probe``), ``inputs_fn(batch)`` for the model's inputs, ``draws``,
    ``stop_on`` (a severity, or None never to stop), ``html``, and ``options`` passed to
    :func:`gradaudit.audit` (``select``, ``ignore``, ``settings``, ...)."""

    def __init__(
        self,
        *,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        inputs_fn: Callable[[Any], tuple] | None = None,
        probe: bool = True,
        draws: int = 2,
        stop_on: str | None = "error",
        html: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if stop_on is not None:
            check_fail_on(stop_on)
        self.loss_fn = loss_fn
        self.inputs_fn = inputs_fn
        self.probe = probe
        self.draws = draws
        self.stop_on = stop_on
        self.html = html
        self.options = options
        #: The :class:`~gradaudit.report.model.AuditReport`, once the audit ran.
        self.report = None
        self.html_path: str | None = None

    def audit(self, model, inputs: tuple, batch: Any):
        """Audit ``model`` on one batch; the report is kept in ``self.report``."""
        import gradaudit

        common = dict(draws=self.draws, device=device_of(model), **self.options)
        if self.loss_fn is not None:
            self.report = gradaudit.audit(model, inputs, loss_fn=self.loss_fn, batch=batch, **common)
        else:
            self.report = gradaudit.audit(model, inputs, probe=self.probe, **common)
        return self.report


def device_of(model) -> str:
    """The probe device for a model already placed by the framework."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cuda":
        return "cpu"
    return f"cuda:{first.device.index or 0}"


def metrics(report) -> dict[str, float]:
    """Numeric figures for a logger: per layer the predicted (and measured) RMS of the
    output and of the gradient, the gradient of the user's loss, finding counts, the
    predicted gradient spread and whether the audit passes (``ok`` at error)."""
    out: dict[str, float] = {}
    for layer in report.layers:
        name = layer.module or layer.node
        figures = {"predicted_act_rms": layer.predicted.act_rms, "predicted_grad_rms": layer.predicted.grad_rms}
        if layer.measured is not None:
            figures.update(measured_act_rms=layer.measured.act_rms, measured_grad_rms=layer.measured.grad_rms)
        if isinstance(layer.extra.get("loss_grad_rms"), (int, float)):
            figures["loss_grad_rms"] = layer.extra["loss_grad_rms"]
        for key, value in figures.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{PREFIX}/{key}/{name}"] = float(value)
    for severity, count in report.counts().items():
        out[f"{PREFIX}/findings/{severity}"] = float(count)
    spread = report.depth.spread_decades
    if isinstance(spread, (int, float)) and math.isfinite(spread):
        out[f"{PREFIX}/gradient_spread_decades"] = float(spread)
    out[f"{PREFIX}/ok"] = float(report.ok("error"))
    return out


def write_html(report, folder: str | None) -> str | None:
    """The HTML report as ``gradaudit.html`` in ``folder`` (created if needed)."""
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "gradaudit.html")
    report.to_html(path)
    return path


def stops(report, stop_on: str | None) -> bool:
    """Whether the run should stop: a finding at or above ``stop_on`` (None: never)."""
    if stop_on is None:
        return False
    check_fail_on(stop_on)
    from gradaudit.rules.base import SEVERITY_ORDER

    return any(SEVERITY_ORDER[f.severity] <= SEVERITY_ORDER[stop_on] for f in report.findings)


def summary(report, html: str | None) -> str:
    """The line the callbacks print: verdict, counts, where the HTML went."""
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n) or "no findings"
    where = f"; report: {html}" if html else ""
    return f"gradaudit: {report.verdict.upper()} ({counts}){where}"
