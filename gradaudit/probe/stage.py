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


def load_inputs(opts: AuditOptions, inputs: Any, source: str | None = None) -> tuple[Any, str | None, list | None]:
    """``(example inputs, their source, loss batches)`` (``source`` labels the given inputs,
    or the batches when the inputs come from them).

    The user's batch file (``inputs_path``) replaces the example inputs when given. With a
    ``loss_fn``, the loss batches are ``(model inputs, batch)`` per draw
    (:mod:`gradaudit.probe.loss` says which inputs), and a model without example inputs
    runs on the first batch's. Call it where the RNG states are restored afterwards: a
    batch callable or a shuffling ``DataLoader`` draws from them.
    """
    from gradaudit.errors import ConfigError

    file_batches = None
    if opts.inputs_path:
        from gradaudit.probe.inputs import load_batch

        loaded = load_batch(opts.inputs_path)
        inputs, source, file_batches = loaded.inputs, f"file:{opts.inputs_path}", loaded.batches
    if opts.loss_fn is None:
        return inputs, source, None
    from gradaudit.probe import loss

    if opts.batch is not None and file_batches is not None:
        raise ConfigError(f"batch: given twice, as batch and in the file {opts.inputs_path}; give one")
    raw = opts.batch
    if raw is None and file_batches is not None:  # one batch serves every draw; several, one each
        raw = file_batches[0] if len(file_batches) == 1 else iter(file_batches)
    if raw is None:
        where = f" (the file {opts.inputs_path} holds no 'target')" if opts.inputs_path else ""
        raise ConfigError(
            "loss_fn needs a batch: pass batch= to audit(), define example_batch beside loss_fn in the model file, "
            f"or give --inputs a file holding inputs and a target{where}"
        )
    batches = list(loss.batches(raw, opts.draws))
    if not batches:
        raise ConfigError("batch: the iterable of batches gave none")
    explicit = inputs is not None and not loss.several(raw)
    pairs = [(as_tuple(inputs) if explicit else loss.inputs_of(b), b) for b in batches]
    if inputs is None:
        inputs, source = pairs[0][0], f"the first batch of {source}" if source else "the first batch"
    return inputs, source, pairs


def as_tuple(inputs: Any) -> tuple:
    """Example inputs as the tuple of the model's positional inputs."""
    if isinstance(inputs, tuple):
        return inputs
    return tuple(inputs) if isinstance(inputs, list) else (inputs,)


def gather(model, inputs: tuple, analysis, opts: AuditOptions, settings, loss_batches: list | None = None) -> None:
    """Run the probe and/or gradcheck; store their results in ``analysis.config``."""
    if not opts.measures:
        return
    from gradaudit.probe.device import resolve_device
    from gradaudit.probe.gradients import probe

    started = time.perf_counter()
    onnx = type(model).__name__ == "OnnxModel"
    device = "cpu" if onnx and opts.device == "auto" else resolve_device(opts.device)
    if onnx:
        from gradaudit.errors import ConfigError

        if opts.gradcheck:
            raise ConfigError("--gradcheck checks custom autograd code of a PyTorch model; an ONNX graph has none")
        from gradaudit.probe.onnx import probe
    if opts.probe:
        analysis.config["probe"] = probe(
            model, inputs, analysis, draws=opts.draws, device=device, dtype=opts.dtype, settings=settings,
            loss_fn=opts.loss_fn, loss_batches=loss_batches,
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
            if hasattr(result, "layer_extra"):  # the ONNX probe's finite-difference uncertainties
                layer.extra.update(_num(result.layer_extra(layer.node)))
            lm = result.loss.layers.get(layer.node) if result.loss is not None else None
            if lm is not None and lm.grad_draws:
                layer.extra["loss_grad_rms"] = _num(lm.grad_rms)
                layer.extra["loss_weight_grad_rms"] = _num(lm.weight_grad_rms)
            row = rows.get(layer.node)
            if row is not None:
                layer.extra["act_log10_error"] = _num(row["act_log10_error"])
                layer.extra["grad_log10_error"] = _num(row["grad_log10_error"])
        report.probe = result.to_json()
    if analysis.config.get("gradcheck") is not None:
        report.gradcheck = analysis.config["gradcheck"]


def _num(x):
    from gradaudit.probe.result import clean

    return clean(x)
