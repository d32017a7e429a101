"""Predicted vs measured: per layer, log10(measured / predicted) of the output RMS and of
the gradient RMS, both under DESIGN.md's loss L = sum <y, g>, g ~ N(0, 1).

A layer agrees within 2x when both |log10 errors| <= log10 2. A row also says why the
prediction may be unreliable there: an estimated op at or up to three ops before it,
inputs of the batch that are correlated (``input_batch_cosine``), or a disagreement
inherited from an earlier layer (``inherited``: an upstream activation off by > 10x).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.probe.result import ProbeResult


def agreement(analysis, result: ProbeResult) -> list[dict]:
    """One row per layer with both a prediction and a measurement."""
    estimated = {e.node for e in analysis.estimates}
    rows = []
    upstream_bad = False
    for node in analysis.layers():
        s = analysis.stat(node.name)
        m = result.layers.get(node.name)
        if s is None or m is None:
            continue
        row = {
            "node": node.name,
            "module": node.module,
            "predicted_act_rms": s.act_rms,
            "measured_act_rms": m.act_rms,
            "predicted_grad_rms": s.grad_rms,
            "measured_grad_rms": m.grad_rms,
            "act_log10_error": _log_err(m.act_rms, s.act_rms),
            "grad_log10_error": _log_err(m.grad_rms, s.grad_rms),
        }
        errs = [e for e in (row["act_log10_error"], row["grad_log10_error"]) if e is not None]
        row["within_2x"] = all(abs(e) <= math.log10(2) for e in errs) if len(errs) == 2 else None
        row["estimated"] = node.name in estimated or any(p.name in estimated for p in _ancestors(analysis, node, 3))
        row["input_batch_cosine"] = m.input_batch_cosine
        row["inherited"] = upstream_bad
        if row["act_log10_error"] is not None and abs(row["act_log10_error"]) > 1:
            upstream_bad = True
        rows.append(row)
    return rows


def input_rms(analysis, call) -> list[dict]:
    """Measured RMS of each floating input beside the RMS the prediction assumed."""
    import torch

    from gradaudit.frontends.signature import ExampleCall

    out = []
    graph = analysis.graph
    given = dict(ExampleCall.of(call).named())
    for i, name in enumerate(graph.input_names):
        key = graph.input_args[i] if i < len(graph.input_args) else str(i)
        x = given.get(key)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            continue
        s = analysis.stat(name)
        measured = float(x.detach().double().pow(2).mean().sqrt()) if x.numel() else float("nan")
        out.append({"input": name, "measured_rms": measured, "predicted_rms": s.act_rms if s else None})
    return out


def _ancestors(analysis, node, depth: int):
    out = []
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for name in n.inputs:
                src = analysis.graph[name]
                out.append(src)
                nxt.append(src)
        frontier = nxt
    return out


def _log_err(measured: float, predicted: float) -> float | None:
    """log10(measured / predicted). A prediction that is not finite, or 0 where the
    measurement is not (and the reverse), is the largest disagreement (+-inf), never a
    value to skip; None only when the measurement itself is not finite (GA601's case)."""
    if not math.isfinite(measured):
        return None
    if not math.isfinite(predicted):
        return math.inf
    if measured == predicted == 0:
        return 0.0
    if measured <= 0 or predicted <= 0:
        return math.inf if measured > predicted else -math.inf
    return math.log10(measured / predicted)
