"""Reduced precision: run the probe under ``torch.autocast`` in float16 or bfloat16.

Under autocast, matrix products and convolutions run in the reduced dtype and their
outputs are stored in it. float16 has a largest finite value of 65504 and a smallest
positive (subnormal) value of 2^-24 ~ 6.0e-8; bfloat16 keeps float32's range (3.4e38)
with 8 bits of mantissa. Two things go wrong without care:

* overflow: an activation beyond the dtype's largest value becomes ``inf`` (and then
  ``nan`` downstream) — found as the first node, in execution order, whose output is not
  finite in the reduced run while the float32 run of the same draw is finite;
* gradient overflow: the same for the backward pass (the first op whose backward gives an
  Inf/NaN gradient in the reduced dtype only) — what ``GradScaler`` detects and skips;
* underflow: a gradient entry below the smallest subnormal becomes exactly 0 — measured
  per layer as the fraction of entries of dL/d(output) and of the weight gradient that
  are 0 in the reduced run but not in the float32 run of the same draw (same seed, same
  cotangent g). Loss scaling (``torch.amp.GradScaler``) multiplies the loss so these
  gradients stay representable (Micikevicius et al., "Mixed Precision Training", ICLR
  2018).

On CPU, ``torch.autocast("cpu", dtype=torch.float16)`` runs linear and convolution in
float16 (verified on torch 2.13); ops autocast does not cover keep their float32 inputs.
"""

from __future__ import annotations

import math
from typing import Any

#: ``--dtype`` values -> the autocast dtype (``None``: plain float32).
DTYPES: dict[str, Any] = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def autocast_dtype(dtype: str):
    """The torch dtype for ``--dtype`` (``None`` for fp32)."""
    return _torch_dtype(DTYPES[dtype])


def check_precision(reduced_run, reference, dtype: str, reduced, runner, settings) -> dict[str, Any]:
    """Compare the reduced-precision draw with the float32 draw of the same seed
    (``reduced``: the autocast torch dtype, :func:`autocast_dtype`)."""
    import torch

    from gradaudit.probe.thresholds import threshold

    info = torch.finfo(reduced)
    smallest = info.tiny * info.eps  # smallest positive subnormal
    out: dict[str, Any] = {
        "dtype": dtype,
        "max": float(info.max),
        "smallest_subnormal": float(smallest),
        "overflow": None,
        "grad_overflow": None,
        "beyond_range": [],
        "underflow": [],
    }
    order = [n.name for n in runner.nodes]
    # float32 values beyond the reduced dtype's range, wherever they occur
    for name in order:
        amax = reference.absmax.get(name)
        if amax is not None and math.isfinite(amax) and amax > info.max:
            out["beyond_range"].append({"node": name, "absmax_float32": amax})
    first = reduced_run.first_forward if reduced_run is not None else None
    if first is not None and reference.first_forward is None:
        ref_amax = reference.absmax.get(first.node)
        out["overflow"] = {
            "node": first.node,
            "op": first.op,
            "module": first.module,
            "location": first.location,
            "value": first.value,
            "absmax_float32": ref_amax,
            "output_dtype": reduced_run.out_dtype.get(first.node),
            "inputs": first.inputs,
            "weights": first.weights,
            "depth": _layer_index(runner, first.node),
        }
        return out
    back = reduced_run.first_backward if reduced_run is not None else None
    if back is not None and reference.first_forward is None and reference.first_backward is None:
        out["grad_overflow"] = {
            "node": back.node,
            "op": back.op,
            "module": back.module,
            "location": back.location,
            "value": back.value,
            "gradient_of": back.gradient_of,
        }
        return out
    limit = threshold(settings, "underflow_fraction")
    for name in runner.layers:
        row: dict[str, Any] = {"node": name, "module": runner.layers[name]}
        lost = False
        if name in reduced_run.grad_zero and name in reference.grad_zero:
            numel = _numel(runner, name)
            frac = max(reduced_run.grad_zero[name] - reference.grad_zero[name], 0) / max(numel, 1)
            row["grad_underflow_fraction"] = frac
            lost = lost or frac > limit
        if name in reduced_run.weight_grad_zero and name in reference.weight_grad_zero:
            numel = sum(p.numel() for p in runner.layer_params.get(name, []) if p.requires_grad)
            frac = max(reduced_run.weight_grad_zero[name] - reference.weight_grad_zero[name], 0) / max(numel, 1)
            row["weight_grad_underflow_fraction"] = frac
            lost = lost or frac > limit
        if lost:
            row["reference_grad_rms"] = math.sqrt(reference.grad_sq[name]) if name in reference.grad_sq else None
            out["underflow"].append(row)
    return out


def _numel(runner, name: str) -> int:
    node = runner.ir_node(name)
    return node.meta.numel if node is not None and node.meta is not None else 1


def _layer_index(runner, name: str) -> int | None:
    """1-based index of the layer at or before ``name`` in execution order."""
    index = None
    k = 0
    for n in runner.nodes:
        if n.name in runner.layers:
            k += 1
            index = k
        if n.name == name:
            return index
    return None
