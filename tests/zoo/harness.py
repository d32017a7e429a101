"""The model-zoo tier: real architectures audited end to end, one line per model.

Each model is audited with the probe (the static prediction, then a real
forward/backward at the same layers; :func:`gradaudit.audit` with ``probe=True``) and
checked for what a user needs from the tool on an untouched model at its library's
default initialisation:

- the audit runs without error (whichever capture it takes);
- every weight layer gets statistics (the verdict is not ``incomplete``: no layer left
  without a prediction, no non-finite prediction);
- no finding of ``error`` severity.

Every model prints one line (frontend, verdict, median and p90 of
|log10(predicted / measured)|, the fraction of layer statistics within 2x, wall and CPU
seconds of the audit), so a regression is visible in CI's log. The accuracy target (at
least :data:`WITHIN_2X` of each model's layer statistics within 2x of the measured ones;
a statistic without a finite prediction counts as a miss) is a measured figure, like
speed: ``python benchmarks/zoo.py`` prints every model's agreement, which models meet
it, and the totals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import gradaudit

#: Every model's result, in the order audited: the zoo's conftest prints their lines and
#: the totals in the terminal summary, so CI's log shows them for passing tests too.
RESULTS: list = []

#: Fraction of layer statistics that must be within 2x of the measurement.
WITHIN_2X = 0.90
LOG2 = math.log10(2.0)


@dataclass
class ZooResult:
    name: str
    frontend: str
    verdict: str
    errors: list[str]
    errors_log10: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    layers: int = 0

    @property
    def within(self) -> float:
        if not self.errors_log10:
            return 0.0
        return sum(1 for e in self.errors_log10 if e <= LOG2) / len(self.errors_log10)

    def quantile(self, q: float) -> float:
        if not self.errors_log10:
            return math.inf
        xs = sorted(self.errors_log10)
        return xs[min(int(q * len(xs)), len(xs) - 1)]

    def line(self) -> str:
        return (
            f"zoo {self.name:32s} {self.frontend:7s} {self.verdict:18s} layers={self.layers:4d} "
            f"median={self.quantile(0.5):.3f} p90={self.quantile(0.9):.3f} within2x={self.within:.0%} "
            f"{self.seconds:6.1f}s wall {self.cpu_seconds:6.1f}s cpu" + (f"  errors: {'; '.join(self.errors)}" if self.errors else "")
        )


def audit_zoo(name: str, model: torch.nn.Module, inputs) -> ZooResult:
    """Audit ``model`` with the probe; gather what the zoo asserts; print its line."""
    started, cpu = time.perf_counter(), time.process_time()
    report = gradaudit.audit(model, inputs, probe=True, draws=2)
    errors_log10 = []
    for layer in report.layers:
        m = layer.measured
        for pred, meas in ((layer.predicted.act_rms, m.act_rms if m else float("nan")),
                           (layer.predicted.grad_rms, m.grad_rms if m else float("nan"))):
            if math.isfinite(pred) and math.isfinite(meas) and pred > 0 and meas > 0:
                errors_log10.append(abs(math.log10(pred / meas)))
            elif pred == 0 and meas == 0:
                errors_log10.append(0.0)
            else:
                errors_log10.append(math.inf)
    result = ZooResult(
        name=name,
        frontend=report.frontend,
        verdict=report.verdict,
        errors=[f"{f.rule} {f.message[:120]}" for f in report.findings if f.severity == "error"],
        errors_log10=errors_log10,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu,
        layers=len(report.layers),
    )
    print(result.line())
    RESULTS.append(result)
    return result


def check(result: ZooResult) -> None:
    """The zoo's assertions, with the numbers in the message."""
    problems = []
    if result.verdict == "incomplete":
        problems.append("the audit could not put statistics on every weight layer")
    if result.errors:
        problems.append(f"error-severity findings at default init: {result.errors}")
    assert not problems, f"{result.name} ({result.frontend}, {result.verdict}): " + "; ".join(problems)
