"""Where a forward value or a backward gradient first stopped being finite.

Forward: the first node, in execution order, whose output holds a NaN or an Inf.
Backward: the first gradient, in backward execution order, that is not finite; the op
blamed is a user of that node whose own gradients were finite (its backward produced the
non-finite value). Each report carries min / max / abs-max and the non-finite count of
the op's inputs and weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradaudit.probe.recording import leaves
from gradaudit.probe.result import clean

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.probe.recording import DrawRecord
    from gradaudit.probe.runner import Runner


@dataclass
class NonFinite:
    """Where a forward value or a backward gradient first stopped being finite."""

    phase: str  # "forward" | "backward"
    node: str
    op: str
    module: str | None
    location: dict | None
    value: str  # "nan", "inf", "nan and inf"
    inputs: list[dict] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    #: backward: the node whose gradient is non-finite (the culprit's input).
    gradient_of: str | None = None
    cause: str = "nan"  # "nan" | "overflow"
    dtype: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tensor_summary(name: str, t: Any) -> dict | None:
    """min / max / abs-max and the non-finite count of a tensor (for NaN reports)."""
    import torch

    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    d = t.detach()
    finite = torch.isfinite(d)
    n_bad = int((~finite).sum())
    vals = d[finite].double()
    if vals.numel():
        lo, hi, amax = float(vals.min()), float(vals.max()), float(vals.abs().max())
    else:
        lo = hi = amax = float("nan")
    return clean(
        {
            "name": name,
            "shape": list(d.shape),
            "dtype": str(d.dtype).replace("torch.", ""),
            "min": lo,
            "max": hi,
            "absmax": amax,
            "nonfinite": n_bad,
        }
    )


def _kind(t) -> str:
    import torch

    nan = bool(torch.isnan(t).any())
    inf = bool(torch.isinf(t).any())
    return "nan and inf" if nan and inf else ("nan" if nan else "inf")


def describe_inputs(runner: Runner, n, args, kwargs) -> tuple[list[dict], list[dict]]:
    """Summaries of the fx node's tensor inputs and of its module's weights/constants."""
    import torch

    ins: list[dict] = []
    flat: list = []
    leaves((args, kwargs), flat)
    names = [a.name for a in n.all_input_nodes]
    for k, t in enumerate(flat):
        s = tensor_summary(names[k] if k < len(names) else f"arg{k}", t)
        if s:
            ins.append(s)
    weights: list[dict] = []
    if n.op == "call_module":
        mod = runner.modules[str(n.target)]
        for pname, p in mod.named_parameters():
            s = tensor_summary(f"{n.target}.{pname}", p)
            if s:
                weights.append(s)
    for k, a in enumerate(n.args):
        if isinstance(a, torch.Tensor):
            s = tensor_summary(f"constant{k}", a)
            if s:
                weights.append(s)
    return ins, weights


def nonfinite(runner: Runner, phase: str, n, args, kwargs, t, gradient_of=None) -> NonFinite:
    node = runner.ir_node(n.name)
    ins, weights = describe_inputs(runner, n, args, kwargs) if args is not None else ([], [])
    return NonFinite(
        phase=phase,
        node=n.name,
        op=node.op if node is not None else str(n.target),
        module=node.module if node is not None else None,
        location=node.location.to_json() if node is not None and node.location else None,
        value=_kind(t),
        inputs=ins,
        weights=weights,
        gradient_of=gradient_of,
        dtype=str(t.dtype).replace("torch.", ""),
    )


def check_forward(runner: Runner, n, args, value, rec: DrawRecord) -> None:
    """Record the output's dtype and abs-max; the first non-finite output is kept."""
    import torch

    ts: list = []
    leaves(value, ts)
    for t in ts:
        d = t.detach()
        if d.numel() == 0:
            continue
        fin = torch.isfinite(d)
        rec.out_dtype[n.name] = str(d.dtype).replace("torch.", "")
        amax = float(d[fin].abs().max()) if bool(fin.any()) else float("nan")
        rec.absmax[n.name] = max(rec.absmax.get(n.name, 0.0), amax) if math.isfinite(amax) else amax
        if not bool(fin.all()) and rec.first_forward is None:
            rec.first_forward = nonfinite(runner, "forward", n, args, {}, d)
            break


def first_backward(runner: Runner, order: list, env: dict, rec: DrawRecord) -> None:
    """The first gradient, in backward execution order, that is not finite; blame the
    op whose backward produced it: a user of that node whose own gradients were finite."""
    import torch.fx as fx

    bad_at: dict[str, Any] = {}
    first = None
    for name, finite, g in order:
        if not finite and name not in bad_at:
            bad_at[name] = g
            if first is None:
                first = name
    if first is None:
        return
    src = next(n for n in runner.nodes if n.name == first)
    culprit = None
    for user in src.users:
        if user.op == "output":
            continue
        if user.name not in bad_at:
            culprit = user
            break
    g = bad_at[first]
    target = culprit if culprit is not None else src
    args = fx.node.map_arg(target.args, lambda a: env.get(a.name))
    kwargs = fx.node.map_arg(target.kwargs, lambda a: env.get(a.name))
    rec.first_backward = nonfinite(runner, "backward", target, args, kwargs, g, gradient_of=first)
