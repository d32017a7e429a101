"""The measured stages of :func:`gradaudit.audit`: evidence only, no rules.

``gather`` runs the probe and/or the gradcheck (as :class:`~gradaudit.options.AuditOptions`
asks) and stores their results in ``analysis.config`` (``"probe"``, ``"gradcheck"``,
``"device"``), where the rule catalog reads them in its single pass. ``attach`` then
writes the measured numbers into the report: ``layers[i].measured`` and extra measured
fields, the ``probe`` and ``gradcheck`` blocks and the environment's device and dtype.
This module never calls back into :mod:`gradaudit.api`.
"""

from __future__ import annotations

import time
from typing import Any

from gradaudit.options import AuditOptions


def load_inputs(opts: AuditOptions, inputs: Any) -> tuple[Any, str | None]:
    """The user's batch (``inputs_path``) replaces the example inputs when given."""
    if not opts.inputs_path:
        return inputs, None
    from gradaudit.probe.inputs import load_batch

    return load_batch(opts.inputs_path), f"file:{opts.inputs_path}"


def gather(model, inputs: tuple, analysis, opts: AuditOptions, settings) -> None:
    """Run the probe and/or gradcheck; store their results in ``analysis.config``."""
    if not opts.measures:
        return
    from gradaudit.errors import ConfigError
    from gradaudit.probe.gradients import probe, resolve_device

    if opts.loss_fn is not None:
        raise ConfigError("loss_fn: a user-supplied loss is not supported by this version of gradaudit")
    started = time.perf_counter()
    device = resolve_device(opts.device)
    if opts.probe:
        analysis.config["probe"] = probe(
            model, inputs, analysis, draws=opts.draws, device=device, dtype=opts.dtype, settings=settings
        )
    if opts.gradcheck:
        from gradaudit.probe.gradcheck import gradcheck

        analysis.config["gradcheck"] = gradcheck(model, inputs, modules=list(opts.gradcheck_modules), device=device)
    analysis.config["device"] = device
    analysis.config["probe_seconds"] = time.perf_counter() - started


def attach(report, analysis, opts: AuditOptions) -> None:
    """Write measured numbers, the probe block and gradcheck results into ``report``."""
    from gradaudit.propagation.depth import layer_gradient
    from gradaudit.report.model import Moments

    if not opts.measures:
        return
    result = analysis.config.get("probe")
    report.environment["device"] = analysis.config.get("device", "cpu")
    report.environment["probe_seconds"] = round(analysis.config.get("probe_seconds", 0.0), 4)
    if result is not None:
        report.environment["dtype"] = {"fp32": "float32", "bf16": "bfloat16 (autocast)", "fp16": "float16 (autocast)"}[
            opts.dtype
        ]
        rows = {r["node"]: r for r in result.agreement}
        for layer in report.layers:
            m = result.layers.get(layer.node)
            if m is None or not m.draws:
                continue
            node = analysis.graph[layer.node]
            layer.measured = Moments(m.act_rms, m.grad_rms, layer_gradient(node, m.grad_rms) if layer.depth else None)
            layer.extra["measured_weight_grad_rms"] = _num(m.weight_grad_rms)
            layer.extra["measured_grad_weight_ratio"] = _num(m.grad_weight_ratio)
            row = rows.get(layer.node)
            if row is not None:
                layer.extra["act_log10_error"] = _num(row["act_log10_error"])
                layer.extra["grad_log10_error"] = _num(row["grad_log10_error"])
        report.probe = result.to_json()
    if analysis.config.get("gradcheck") is not None:
        report.gradcheck = analysis.config["gradcheck"]


def _num(x):
    from gradaudit.probe.gradients import _clean

    return _clean(x)
