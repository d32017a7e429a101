"""``gradaudit.audit``: the single entry point of the CLI and of users' scripts.

    evidence:  capture (frontend) -> propagate -> coverage -> (probe, gradcheck)
    rules:     the catalog, once, over all the evidence
    report:    AuditReport (renderers only format it)
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from gradaudit import __version__
from gradaudit.errors import CaptureError, ConfigError, GradauditError
from gradaudit.ir import Graph
from gradaudit.options import AuditOptions
from gradaudit.propagation import coverage, gates
from gradaudit.propagation.depth import layer_gradient, summarize
from gradaudit.propagation.engine import Analysis, PropagationError, propagate
from gradaudit.report.model import AuditReport, LayerRecord, Moments
from gradaudit.rules.base import SEVERITY_ORDER, Finding, all_rules, resolve_codes
from gradaudit.state import preserved


@dataclass
class Settings:
    """Thresholds the rules read (``[tool.gradaudit]`` may override them)."""

    #: Decades of gradient change (from the last weight layer) that count as vanishing /
    #: exploding: 3 = a factor 1000 (AUTOTRAINER's 1e-3 ratio).
    crossing_decades: float = 3.0
    #: Depth (weight layers) from which structural rules (no normalization, no residual,
    #: saturating stacks) start to apply.
    deep: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


def audit(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    probe: bool = False,
    draws: int = 2,
    loss_fn: Callable[..., Any] | None = None,
    batch: Any = None,
    gradcheck: bool = False,
    gradcheck_modules: Sequence[str] = (),
    dtype: str = "fp32",
    device: str = "cpu",
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    settings: Settings | None = None,
    inputs_path: str | None = None,
    input_stats: dict[int, tuple[float, float]] | Sequence[tuple[float, float]] | None = None,
    per_module_ignores: dict[str, list[str]] | None = None,
    target: str | None = None,
    input_source: str | None = None,
) -> AuditReport:
    """Audit ``model`` for vanishing and exploding gradients at initialisation.

    ``example_inputs``: a tensor or a tuple of tensors (only shapes and dtypes are used by
    the static pass); inferred from the first layer when omitted.

    Measured stages (off by default):
    ``probe`` runs a short real forward/backward (``draws`` draws of a random cotangent)
    and puts measured statistics beside the predicted ones; ``loss_fn(output, batch)`` with
    a real ``batch`` makes it differentiate your loss instead (and turns it on);
    ``gradcheck`` numerically checks custom backward code (``gradcheck_modules`` names the
    modules to check and turns it on); ``dtype`` (``fp32``, ``bf16``, ``fp16``: autocast)
    and ``device`` (``cpu``, ``cuda``, ``auto``) are the probe's; ``inputs_path`` is a batch
    file (``.pt`` read with ``weights_only=True``, or ``.safetensors``) replacing the
    example inputs.

    Rules: ``select`` / ``ignore`` take rule codes or prefixes (``GA1``);
    ``per_module_ignores`` maps globs over qualified module names to codes not reported
    there; ``settings`` holds thresholds (:class:`Settings`). The propagation starts from
    the example inputs' own statistics (per channel; zeros and constants included);
    ``input_stats`` overrides them with (mean, std) per input (std 0: a constant).
    ``target`` and ``input_source``
    label the report.

    Returns an :class:`~gradaudit.report.model.AuditReport`: ``.verdict``, ``.ok``,
    ``.findings``, ``.layers``, ``.to_json()``, ``.to_sarif()``, ``.to_html(path)``,
    ``.raise_for_findings()``. Bad options raise :class:`~gradaudit.errors.ConfigError`;
    an unknown option is a ``TypeError``.

    The model is left exactly as found: parameters, buffers, modes, ``requires_grad``,
    ``.grad``, hooks and the global RNG states.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"audit() needs an nn.Module, got {type(model).__name__}")
    opts = AuditOptions(
        probe=probe, draws=draws, loss_fn=loss_fn, batch=batch, gradcheck=gradcheck,
        gradcheck_modules=tuple(gradcheck_modules or ()), dtype=dtype, device=device, inputs_path=inputs_path,
        per_module_ignores=dict(per_module_ignores or {}),
    )
    return run(model, example_inputs, opts, select=select, ignore=ignore, settings=settings,
               input_stats=input_stats, target=target, input_source=input_source)


def run(
    model: nn.Module,
    example_inputs: Any,
    opts: AuditOptions,
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    settings: Settings | None = None,
    input_stats: Any = None,
    target: str | None = None,
    input_source: str | None = None,
) -> AuditReport:
    """:func:`audit` with its measured stages as one :class:`AuditOptions`.

    Evidence first (capture, propagation, coverage, probe, gradcheck), then the rule
    catalog once over all of it, then the report.
    """
    settings = settings or Settings()
    started = time.perf_counter()
    from gradaudit.probe import stage

    example_inputs, batch_source = stage.load_inputs(opts, example_inputs)
    input_source = batch_source or input_source
    if example_inputs is None:
        from gradaudit.loading import infer_inputs

        example_inputs, inferred = infer_inputs(model)
        input_source = input_source or inferred
    inputs = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    )
    input_source = input_source or "given"
    codes = _selected_codes(select, ignore)
    with preserved(model):
        graph = capture(model, inputs)
        analysis = analyse(graph, inputs, input_stats, settings)
        analysis.coverage = coverage.check(analysis, model_has_parameters=any(True for _ in model.parameters()))
        static_seconds = time.perf_counter() - started
        stage.gather(model, inputs, analysis, opts, settings)
        findings = run_rules(analysis, codes)
        from gradaudit.suppress import UNUSED_CODE
        from gradaudit.suppress import apply as apply_suppressions

        findings, suppressed, unused = apply_suppressions(
            findings, graph, model, opts.per_module_ignores or None, target=target,
            report_unused=UNUSED_CODE in codes,
        )
        findings = sorted(findings + unused, key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, f.node or ""))
        report = build_report(
            analysis, findings, target=target or type(model).__name__, input_source=input_source, inputs=inputs
        )
        report.suppressed = suppressed
        stage.attach(report, analysis, opts)
        report.environment["static_seconds"] = round(static_seconds, 4)
    return report


def capture(model: nn.Module, inputs: tuple) -> Graph:
    """Model -> IR with the best frontend that works (torch.fx today)."""
    from gradaudit.frontends import fx

    return fx.trace(model, inputs)


def analyse(graph: Graph, inputs: tuple, input_stats: Any, settings: Settings) -> Analysis:
    """Propagation over ``graph``, plus the evidence about the prediction itself: its
    coverage of the model and, when the model has zero-initialised gates, the same
    propagation with them opened (:mod:`gradaudit.propagation.gates`)."""
    from gradaudit.propagation.inputs import input_statistics

    stats_by_name: dict[str, Any] = input_statistics(graph, inputs)  # the example inputs' own moments
    if input_stats:
        items = input_stats.items() if isinstance(input_stats, dict) else enumerate(input_stats)
        for i, ms in items:
            if not 0 <= int(i) < len(graph.input_names):
                raise ConfigError(f"input_stats names input {i}, but the model takes {len(graph.input_names)}")
            stats_by_name[graph.input_names[int(i)]] = (float(ms[0]), float(ms[1]))
    try:
        analysis = propagate(graph, stats_by_name)
        analysis.gates = gates.find(analysis)
        if analysis.gates:
            analysis.opened = propagate(gates.opened_graph(graph, analysis.gates), stats_by_name)
            analysis.opened.config["settings"] = settings
    except PropagationError as exc:
        raise CaptureError(str(exc)) from exc
    analysis.config["settings"] = settings
    return analysis


def _selected_codes(select: Iterable[str] | None, ignore: Iterable[str] | None) -> set[str]:
    try:
        chosen = resolve_codes(list(select)) if select else set(all_rules())
        dropped = resolve_codes(list(ignore)) if ignore else set()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return chosen - dropped


#: The evidence each rule stage needs in ``analysis.config``: static rules always run,
#: probe and gradcheck rules only when that stage ran.
_STAGE_EVIDENCE = {"static": None, "probe": "probe", "gradcheck": "gradcheck"}


def run_rules(analysis: Analysis, codes: set[str]) -> list[Finding]:
    """The rule catalog, once, over all the evidence ``analysis`` holds."""
    findings: list[Finding] = []
    for code, cls in all_rules().items():
        if code not in codes or cls.stage not in _STAGE_EVIDENCE:
            continue  # (the "suppression" stage, GA901, runs with the suppressions)
        needs = _STAGE_EVIDENCE[cls.stage]
        if needs is not None and analysis.config.get(needs) is None:
            continue
        findings.extend(cls().check(analysis))
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, f.node or ""))
    return findings


def build_report(analysis: Analysis, findings: list[Finding], *, target: str, input_source: str, inputs: tuple) -> AuditReport:
    weight_layers = analysis.weight_layers()
    depth_of = {n.name: i + 1 for i, n in enumerate(weight_layers)}
    estimated = {e.node for e in analysis.estimates}
    layers = []
    for node in analysis.layers():
        s = analysis.stat(node.name)
        if s is None:
            continue
        weight = node.name in depth_of
        layers.append(
            LayerRecord(
                node=node.name,
                module=node.module,
                op=node.op,
                module_type=node.module_type,
                predicted=Moments(s.act_rms, s.grad_rms, layer_gradient(node, s.grad_rms) if weight else None),
                depth=depth_of.get(node.name),
                estimated=node.name in estimated,
                location=node.location.to_json() if node.location else None,
            )
        )
    grads = [r.predicted.layer_grad for r in layers if r.predicted.layer_grad is not None]
    from gradaudit.rules.helpers import gradient_profile

    prof = gradient_profile(analysis)
    return AuditReport(
        judged=None if prof is None else (prof.source, prof.summary),
        coverage=analysis.coverage,
        target=target,
        frontend=analysis.graph.frontend,
        input_source=input_source,
        inputs=[_describe_input(x) for x in inputs],
        findings=findings,
        layers=layers,
        depth=summarize(grads),
        estimated_ops=[e.to_json() for e in analysis.estimates],
        environment=environment(),
    )


def _describe_input(x: Any) -> dict:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    return {"value": repr(x)[:80]}


def environment() -> dict[str, Any]:
    return {
        "gradaudit": __version__,
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
        "device": "cpu",
        "dtype": "float32",
    }


def exit_code(report: AuditReport, fail_on: str = "error") -> int:
    """4 when the audit is incomplete, 1 when a finding is at or above ``fail_on``, else 0."""
    return report.exit_code(fail_on)


__all__ = ["audit", "AuditOptions", "Settings", "exit_code", "GradauditError"]
