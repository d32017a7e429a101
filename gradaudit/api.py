"""``gradaudit.audit``: the single entry point of the CLI and of users' scripts.

    capture (frontend) -> propagate -> rules -> (probe) -> AuditReport
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from gradaudit import __version__
from gradaudit.errors import CaptureError, ConfigError, GradauditError
from gradaudit.ir import Graph
from gradaudit.propagation.depth import summarize
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
    model: Any,
    example_inputs: Any = None,
    *,
    target: str | None = None,
    input_source: str | None = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    input_stats: dict[int, tuple[float, float]] | Sequence[tuple[float, float]] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> AuditReport:
    """Audit ``model`` for vanishing and exploding gradients at initialisation.

    ``model`` is an ``nn.Module`` or an ONNX model (a ``.onnx`` path, an
    ``onnx.ModelProto`` or :func:`gradaudit.frontends.onnx_load.load`'s result).
    ``example_inputs`` is a tensor or a tuple of tensors (only shapes and dtypes are
    used by the static pass); when omitted they are inferred from the first layer.
    ``select`` / ``ignore`` take rule codes or prefixes (``GA1``). ``input_stats``
    gives (mean, std) per input (default N(0, 1) per element).

    The model is left exactly as found: parameters, buffers, modes, ``requires_grad``,
    ``.grad``, hooks and the global RNG states.
    """
    model = _onnx_model(model)
    onnx = not isinstance(model, nn.Module)
    settings = settings or Settings()
    started = time.perf_counter()
    from gradaudit.probe import stage

    stage_options = stage.parse_options(options)
    example_inputs, batch_source = stage.load_inputs(stage_options, example_inputs)
    input_source = batch_source or input_source
    if example_inputs is None and onnx:
        from gradaudit.frontends.onnx_load import example_inputs as declared_inputs

        example_inputs, inferred, declared_stats = declared_inputs(model)
        input_source, input_stats = input_source or inferred, input_stats or declared_stats
    elif example_inputs is None:
        from gradaudit.loading import infer_inputs

        example_inputs, inferred = infer_inputs(model)
        input_source = input_source or inferred
    inputs = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    )
    input_source = input_source or "given"
    codes = _selected_codes(select, ignore)
    with preserved(None if onnx else model):
        graph = capture(model, inputs)
        analysis = analyse(graph, inputs, input_stats, settings)
        findings = run_rules(analysis, codes)
        static_seconds = time.perf_counter() - started
        findings += stage.run(model, inputs, analysis, codes, stage_options, settings)
        from gradaudit.suppress import UNUSED_CODE, apply as apply_suppressions

        findings, suppressed, unused = apply_suppressions(
            findings, graph, None if onnx else model, options.get("per_module_ignores"),
            target=None if onnx else target, report_unused=UNUSED_CODE in codes,
        )
        findings = sorted(findings + unused, key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, f.node or ""))
        report = build_report(
            analysis, findings, target=target or getattr(model, "label", type(model).__name__),
            input_source=input_source, inputs=inputs,
        )
        report.suppressed = suppressed
        if onnx:
            from gradaudit.frontends.onnx_load import versions

            report.environment.update(versions())
        stage.attach(report, analysis, stage_options)
        report.environment["static_seconds"] = round(static_seconds, 4)
    return report


def capture(model: Any, inputs: tuple) -> Graph:
    """Model -> IR with the best frontend that works (torch.fx for a module, the ONNX
    frontend for a loaded ONNX model)."""
    if not isinstance(model, nn.Module):
        from gradaudit.frontends import onnx

        return onnx.capture(model, inputs)
    from gradaudit.frontends import fx

    return fx.trace(model, inputs)


def _onnx_model(model: Any) -> Any:
    """``model`` itself for an ``nn.Module``; an ONNX model (loaded by
    :func:`gradaudit.frontends.onnx_load.load`, an ``onnx.ModelProto`` or a path to a
    ``.onnx`` file) as an :class:`~gradaudit.frontends.onnx_load.OnnxModel`."""
    if isinstance(model, nn.Module):
        return model
    from gradaudit.frontends import onnx_load

    if isinstance(model, onnx_load.OnnxModel):
        return model
    if isinstance(model, str) and model.lower().endswith(".onnx"):
        return onnx_load.load(model)
    if type(model).__name__ == "ModelProto":
        return onnx_load.from_proto(model)
    raise ConfigError(f"audit() needs an nn.Module or an ONNX model, got {type(model).__name__}")


def analyse(graph: Graph, inputs: tuple, input_stats: Any, settings: Settings) -> Analysis:
    stats_by_name: dict[str, tuple[float, float]] = {}
    if input_stats:
        items = input_stats.items() if isinstance(input_stats, dict) else enumerate(input_stats)
        for i, ms in items:
            if not 0 <= int(i) < len(graph.input_names):
                raise ConfigError(f"input_stats names input {i}, but the model takes {len(graph.input_names)}")
            stats_by_name[graph.input_names[int(i)]] = (float(ms[0]), float(ms[1]))
    try:
        analysis = propagate(graph, stats_by_name)
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


def run_rules(analysis: Analysis, codes: set[str], stage: str = "static") -> list[Finding]:
    findings: list[Finding] = []
    for code, cls in all_rules().items():
        if code not in codes or cls.stage != stage:
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
        layers.append(
            LayerRecord(
                node=node.name,
                module=node.module,
                op=node.op,
                module_type=node.module_type,
                predicted=Moments(s.act_rms, s.grad_rms),
                depth=depth_of.get(node.name),
                estimated=node.name in estimated,
                location=node.location.to_json() if node.location else None,
            )
        )
    weight_grads = [analysis.stat(n.name).grad_rms for n in weight_layers if analysis.stat(n.name) is not None]
    all_grads = [layer.predicted.grad_rms for layer in layers]
    depth = summarize(weight_grads, all_grads)
    return AuditReport(
        target=target,
        frontend=analysis.graph.frontend,
        input_source=input_source,
        inputs=[_describe_input(x) for x in inputs],
        findings=findings,
        layers=layers,
        depth=depth,
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
    """0 when no finding is at or above ``fail_on``, else 1."""
    if fail_on not in SEVERITY_ORDER:
        raise ConfigError(f"--fail-on must be one of error, warning, info (got {fail_on!r})")
    limit = SEVERITY_ORDER[fail_on]
    return 1 if any(SEVERITY_ORDER[f.severity] <= limit for f in report.findings) else 0


__all__ = ["audit", "Settings", "exit_code", "GradauditError"]
