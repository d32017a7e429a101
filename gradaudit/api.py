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
from gradaudit.errors import CaptureError, ConfigError, GradauditError, ModelCallError
from gradaudit.ir import Graph
from gradaudit.options import AuditOptions
from gradaudit.propagation import coverage, gates, over_time
from gradaudit.propagation.depth import layer_gradient, summarize
from gradaudit.propagation.engine import Analysis, PropagationError, propagate
from gradaudit.report.model import AuditReport, LayerRecord, Moments
from gradaudit.rules.base import SEVERITY_ORDER, Finding, all_rules, resolve_codes
from gradaudit.serial import fewer_collections, serial
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

    ``model``: an ``nn.Module``, or an ONNX model (a ``.onnx`` path, an
    ``onnx.ModelProto``, or :func:`gradaudit.frontends.onnx_load.load`'s result), whose
    example inputs are positional in graph-input order or keyword by input name.
    ``example_inputs``: a tensor, a tuple (positional inputs, nested tuples allowed), a dict
    of keyword inputs, or an :class:`~gradaudit.frontends.signature.ExampleCall`; numbers,
    bools, ``None`` and strings among them are constants of the graph. Inferred when
    omitted (from the first layer, a Hugging Face config or a timm ``pretrained_cfg``).

    Measured stages (off by default):
    ``probe`` runs a short real forward/backward (``draws`` draws of a random cotangent)
    and puts measured statistics beside the predicted ones; ``loss_fn(output, batch)`` with
    real batches makes it also differentiate your loss, for gradient norms and GA606's
    clipping threshold in your loss's units (and turns it on). ``batch`` is one batch (the
    model runs on ``example_inputs`` when given, else on ``x`` of a batch ``(x, y)``), a
    callable called once per draw for a fresh batch, or an iterable of batches such as a
    ``DataLoader`` (one per draw; the model runs on each batch's ``x``);
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
    model = _onnx_model(model)
    opts = AuditOptions(
        probe=probe, draws=draws, loss_fn=loss_fn, batch=batch, gradcheck=gradcheck,
        gradcheck_modules=tuple(gradcheck_modules or ()), dtype=dtype, device=device, inputs_path=inputs_path,
        per_module_ignores=dict(per_module_ignores or {}),
    )
    return run(model, example_inputs, opts, select=select, ignore=ignore, settings=settings,
               input_stats=input_stats, target=target, input_source=input_source)


def run(
    model: Any,
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

    codes = _selected_codes(select, ignore)
    from gradaudit.frontends import meta

    onnx = not isinstance(model, nn.Module)
    if opts.measures and not onnx:
        meta.refuse_measurement(model)
    # batches may draw from the RNGs: the audit leaves them as found
    # fewer cyclic collections: each traverses the model and every statistic (gradaudit.serial)
    with fewer_collections(), preserved(None if onnx else model):
        example_inputs, input_source, loss_batches = stage.load_inputs(opts, example_inputs, input_source)
        # a model on the meta device is read through a CPU stand-in holding one draw per
        # distinct layer (the model itself stays on meta)
        subject = meta.stand_in(model) if not onnx and meta.is_meta(model) else model
        if example_inputs is None and onnx:
            from gradaudit.frontends.onnx_load import example_inputs as declared_inputs

            example_inputs, inferred, declared_stats = declared_inputs(model)
            input_source, input_stats = input_source or inferred, input_stats or declared_stats
        elif example_inputs is None:
            from gradaudit.loading import infer_inputs

            example_inputs, inferred = infer_inputs(subject)
            input_source = input_source or inferred
        from gradaudit.frontends.signature import ExampleCall

        inputs = ExampleCall.of(meta.real_inputs(example_inputs) if subject is not model else example_inputs)
        input_source = input_source or "given"
        try:
            # the hook capture runs a real forward pass: not on a model too big to allocate
            graph = capture(subject, inputs, frontends=None if subject is model else ("fx", "export"))
            analysis = analyse(graph, inputs, input_stats, settings)
            has_parameters = any(n.params for n in graph) if onnx else any(True for _ in model.parameters())
            analysis.coverage = coverage.check(analysis, model_has_parameters=has_parameters)
        except CaptureError as exc:
            if not opts.probe or onnx or isinstance(exc, ModelCallError):
                raise
            # no capture worked: the probe still measures, at the model's layers
            analysis, codes = unpredicted(model, inputs, exc), {c for c in codes if all_rules()[c].stage != "static"}
        static_seconds = time.perf_counter() - started
        stage.gather(model, inputs, analysis, opts, settings, loss_batches)
        findings = run_rules(analysis, codes)
        from gradaudit.suppress import UNUSED_CODE
        from gradaudit.suppress import apply as apply_suppressions

        findings, suppressed, unused = apply_suppressions(  # an ONNX file has no source lines
            findings, analysis.graph, None if onnx else model, opts.per_module_ignores or None,
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
        stage.attach(report, analysis, opts)
        report.environment["static_seconds"] = round(static_seconds, 4)
    return report


def unpredicted(model: nn.Module, inputs: Any, error: CaptureError) -> Analysis:
    """The evidence of an audit whose static capture failed: the model's layers as found
    by one forward pass (:func:`gradaudit.probe.modules.module_graph`), no predictions,
    and a coverage gap that says why."""
    from gradaudit.probe.modules import module_graph

    graph = module_graph(model, inputs)
    failures = getattr(error, "failures", None) or [("capture", error)]
    graph.notes = [f"{name} failed: {exc}" for name, exc in failures]
    analysis = Analysis(graph, stats={}, roots={}, effects={}, estimates=[])
    layers = [n.module or n.name for n in coverage.parameter_layers(analysis)]
    gap = coverage.Gap("the prediction is unavailable: no capture of the model worked (see the capture notes); "
                       "the probe measured its layers", layers=layers)
    analysis.coverage = coverage.Coverage(len(layers), 0, [gap])
    return analysis


def capture(model: Any, inputs: Any, frontends: tuple[str, ...] | None = None) -> Graph:
    """Model -> IR with the cheapest frontend that works: torch.fx, else torch.export,
    else the hook capture (:mod:`gradaudit.frontends.chain`); the graph's notes say why
    the cheaper ones failed. ``inputs``: a tensor, a tuple, a dict of keyword inputs or
    an :class:`~gradaudit.frontends.signature.ExampleCall`; ``frontends`` restricts the
    chain to the ones named. An ONNX model goes through the ONNX frontend
    (:mod:`gradaudit.frontends.onnx`)."""
    if not isinstance(model, nn.Module):
        from gradaudit.frontends import onnx

        return onnx.capture(model, inputs)
    from gradaudit.frontends.chain import capture as chain

    return chain(model, inputs, frontends)


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


def analyse(graph: Graph, inputs: Any, input_stats: Any, settings: Settings) -> Analysis:
    """Propagation over ``graph``, plus the evidence about the prediction itself: its
    coverage of the model and, when the model has zero-initialised gates, the same
    propagation with them opened (:mod:`gradaudit.propagation.gates`). The propagation
    starts from the example inputs' own statistics (per channel; zeros and constants
    included); ``input_stats`` overrides them with (mean, std) per input, keyed by
    position or by keyword name (every tensor of a nested input gets them; std 0: a
    constant)."""
    from gradaudit.propagation.inputs import input_statistics

    with serial():  # small tensor work: see gradaudit.serial
        stats_by_name: dict[str, Any] = input_statistics(graph, inputs)  # the example inputs' own moments
    if input_stats:
        items = input_stats.items() if isinstance(input_stats, dict) else enumerate(input_stats)
        args = graph.input_args or [str(i) for i in range(len(graph.input_names))]
        for i, ms in items:
            names = [n for n, a in zip(graph.input_names, args) if a == str(i)]
            if not names:
                raise ConfigError(f"input_stats names input {i!r}, but the model's inputs are {', '.join(dict.fromkeys(args))}")
            for name in names:
                stats_by_name[name] = (float(ms[0]), float(ms[1]))
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
    with serial():  # small tensor work: see gradaudit.serial
        for code, cls in all_rules().items():
            if code not in codes or cls.stage not in _STAGE_EVIDENCE:
                continue  # (the "suppression" stage, GA901, runs with the suppressions)
            needs = _STAGE_EVIDENCE[cls.stage]
            if needs is not None and analysis.config.get(needs) is None:
                continue
            findings.extend(cls().check(analysis))
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, f.node or ""))
    return findings


def build_report(analysis: Analysis, findings: list[Finding], *, target: str, input_source: str, inputs: Any) -> AuditReport:
    weight_layers = analysis.weight_layers()
    depth_of = {n.name: i + 1 for i, n in enumerate(weight_layers)}
    estimated = {e.node for e in analysis.estimates}
    layers = []
    unpredicted = not analysis.stats  # no capture worked: the layers carry measurements only
    for node in analysis.layers():
        s = analysis.stat(node.name)
        if s is None and not unpredicted:
            continue
        weight = node.name in depth_of
        layers.append(
            LayerRecord(
                node=node.name,
                module=node.module,
                op=node.op,
                module_type=node.module_type,
                predicted=(Moments(s.act_rms, s.grad_rms, layer_gradient(node, s.grad_rms) if weight else None)
                           if s is not None else Moments(float("nan"), float("nan"))),
                depth=depth_of.get(node.name),
                estimated=node.name in estimated,
                location=node.location.to_json() if node.location else None,
            )
        )
    grads = [r.predicted.layer_grad for r in layers if r.predicted.layer_grad is not None]
    from gradaudit.rules.evidence.profiles import gradient_profile
    from gradaudit.rules.evidence.structure import followed_by_norm, frozen, trained

    prof = gradient_profile(analysis)
    return AuditReport(
        over_time=over_time.over_time(analysis),
        judged=None if prof is None else (prof.source, prof.summary),
        normalized_layers=sum(1 for n in trained(weight_layers) if followed_by_norm(analysis, n)),
        frozen_layers=sum(1 for n in weight_layers if frozen(n)),
        coverage=analysis.coverage,
        target=target,
        frontend=analysis.graph.frontend,
        input_source=input_source,
        inputs=_describe_inputs(inputs),
        findings=findings,
        layers=layers,
        depth=summarize(grads),
        estimated_ops=[e.to_json() for e in analysis.estimates],
        environment=environment(),
        capture_notes=list(analysis.graph.notes),
    )


def _describe_inputs(inputs: Any) -> list[dict]:
    from gradaudit.frontends.signature import ExampleCall

    return ExampleCall.of(inputs).describe()


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
