"""The probe and gradcheck stages of :func:`gradaudit.audit`.

``audit(model, inputs, probe=True, draws=2, inputs_path=None, dtype="fp32",
device="cpu", gradcheck=False, gradcheck_modules=None, **thresholds)``: the options are
validated here (an unknown one is a :class:`~gradaudit.errors.ConfigError`), the
stages run inside the audit's ``preserved(model)`` block, and their results are written
into the report: ``layers[i].measured`` and extra measured fields, ``probe``,
``gradcheck`` and the environment's device and dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import ConfigError

#: Options the probe and gradcheck stages read.
PROBE_OPTIONS = ("probe", "draws", "inputs_path", "dtype", "device", "gradcheck", "gradcheck_modules")
#: Options other stages of the audit read.
OTHER_OPTIONS = ("per_module_ignores",)


@dataclass
class StageOptions:
    probe: bool = False
    draws: int = 2
    inputs_path: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    gradcheck: bool = False
    gradcheck_modules: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.probe or self.gradcheck


def parse_options(options: dict[str, Any]) -> StageOptions:
    """Validate ``audit(**options)``; thresholds of the probe rules may be passed too."""
    out = StageOptions()
    if all(key in OTHER_OPTIONS for key in options):
        return out  # a static audit: the probe's modules need not load
    from gradaudit.probe.gradients import DEFAULTS
    from gradaudit.probe.precision import DTYPES

    for key, value in options.items():
        if key in OTHER_OPTIONS:
            continue
        if key in DEFAULTS:
            try:
                out.thresholds[key] = float(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"option {key} must be a number (got {value!r})") from exc
            continue
        if key not in PROBE_OPTIONS:
            known = ", ".join(sorted(PROBE_OPTIONS + OTHER_OPTIONS + tuple(DEFAULTS)))
            raise ConfigError(f"unknown audit option {key!r} (known: {known})")
        if value is None:
            continue
        if key in ("probe", "gradcheck"):
            setattr(out, key, bool(value))
        elif key == "draws":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"draws must be a positive integer (got {value!r})")
            out.draws = value
        elif key == "dtype":
            if value not in DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got {value!r})")
            out.dtype = value
        elif key == "device":
            if not isinstance(value, str):
                raise ConfigError(f"device must be cpu, cuda or auto (got {value!r})")
            out.device = value
        elif key == "inputs_path":
            out.inputs_path = str(value)
        elif key == "gradcheck_modules":
            if isinstance(value, str):
                value = [value]
            out.gradcheck_modules = [str(v) for v in value]
            if out.gradcheck_modules:
                out.gradcheck = True
    return out


def load_inputs(opts: StageOptions, inputs: tuple) -> tuple[tuple, str | None]:
    """The user's batch (``inputs_path``) replaces the example inputs when given."""
    if not opts.inputs_path:
        return inputs, None
    from gradaudit.probe.inputs import load_batch

    return load_batch(opts.inputs_path), f"file:{opts.inputs_path}"


def with_thresholds(settings, opts: StageOptions):
    if not opts.thresholds:
        return settings
    return dataclasses.replace(settings, extra={**(settings.extra or {}), **opts.thresholds})


def run(model, inputs: tuple, analysis, codes: set[str], opts: StageOptions, settings) -> list:
    """Run the probe and/or gradcheck; store results in ``analysis.config``; return findings."""
    from gradaudit.api import run_rules
    from gradaudit.probe.gradients import probe, resolve_device

    import time

    findings: list = []
    if not opts.active:
        return findings
    started = time.perf_counter()
    onnx = type(model).__name__ == "OnnxModel"
    device = "cpu" if onnx and opts.device == "auto" else resolve_device(opts.device)
    settings = with_thresholds(settings, opts)
    analysis.config["settings"] = settings
    if onnx:
        from gradaudit.probe.onnx import probe
    if opts.probe:
        analysis.config["probe"] = probe(
            model, inputs, analysis, draws=opts.draws, device=device, dtype=opts.dtype, settings=settings
        )
        findings += run_rules(analysis, codes, stage="probe")
    if opts.gradcheck and onnx:
        raise ConfigError("--gradcheck checks custom autograd code of a PyTorch model; an ONNX graph has none")
    if opts.gradcheck:
        from gradaudit.probe.gradcheck import gradcheck

        analysis.config["gradcheck"] = gradcheck(model, inputs, modules=opts.gradcheck_modules, device=device)
        findings += run_rules(analysis, codes, stage="gradcheck")
    analysis.config["device"] = device
    analysis.config["probe_seconds"] = time.perf_counter() - started
    return findings


def attach(report, analysis, opts: StageOptions) -> None:
    """Write measured numbers, the probe block and gradcheck results into ``report``."""
    from gradaudit.report.model import Moments

    if not opts.active:
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
            layer.measured = Moments(m.act_rms, m.grad_rms)
            layer.extra["measured_weight_grad_rms"] = _num(m.weight_grad_rms)
            layer.extra["measured_grad_weight_ratio"] = _num(m.grad_weight_ratio)
            if hasattr(result, "layer_extra"):  # the ONNX probe's finite-difference uncertainties
                layer.extra.update(_num(result.layer_extra(layer.node)))
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
