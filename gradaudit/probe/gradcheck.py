"""Numeric gradient check of hand-written backward code, in float64.

Targets:

* every custom ``torch.autograd.Function`` the model calls (its ``apply`` is observed
  during one forward pass, which records the first call's arguments and the user's line);
* every module that changes its gradients through backward hooks
  (``register_full_backward_hook`` / ``register_full_backward_pre_hook`` /
  ``register_backward_hook``);
* every module named by the user (``--gradcheck-module encoder.block.0``);
* the whole model, by a directional check.

Each target runs on a float64 copy of just itself (a Function needs no copy), on its
recorded input cut to at most two samples along the first dimension, with dropout
modules in eval mode and the global seed fixed before every evaluation, so that the
numeric and the analytic derivative describe the same function.

For a scalar projection s = sum_k <v_k, f_k> with a fixed random v, autograd gives
a_i = ds/dx_i; the numeric value is the central difference

    b_i = sum_k v_k (f_k(x + h e_i) - f_k(x - h e_i)) / (2 h),   h = 1e-6,

taken output entry by output entry before summing, so the entries x_i does not touch
cancel exactly. The relative error |a - b| / (|a| + |b|) is graded as in the gradient-
checking literature (and TheDeepChecker / torch.autograd.gradcheck's float64 design):
< 1e-7 correct, 1e-7..1e-4 acceptable (rounding), 1e-4..1e-2 suspicious, >= 1e-2 wrong.
An entry whose one-sided differences (f(x+h) - f(x)) / h and (f(x) - f(x-h)) / h differ by
more than 1e-4 of their size has a kink within the step: the check retries with
h = 1e-7, then 1e-8; a point still kinked at 1e-8 sits on a kink (ReLU at 0, a max tie)
and is reported, not graded. Entries where |a| + |b| is within 100x of the rounding noise
eps * sum_k |v_k f_k| / h are below the check's resolution and are counted, not graded;
so are entries whose numeric derivative is NaN or inf (the function itself is not finite
there, which the probe reports as GA601): nothing to compare the backward with.

The whole model is checked along one random direction u in parameter and input space
(each tensor's direction scaled to its RMS): autograd's <grad s, u> against
(s(theta + h u) - s(theta - h u)) / (2 h), with float64 copies of the parameters passed
through ``torch.func.functional_call`` — the model itself is not modified.
"""

from __future__ import annotations

import copy
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from gradaudit.errors import ConfigError
from gradaudit.probe.inputs import first_line

#: Steps tried in turn when the one-sided differences disagree (a kink within the step).
STEPS = (1e-6, 1e-7, 1e-8)
SEED = 7
ENTRIES_PER_TENSOR = 12
KINK_TOLERANCE = 1e-4
EPS64 = 2.220446049250313e-16

#: Grade boundaries of the relative error.
GRADES = ((1e-7, "correct"), (1e-4, "acceptable"), (1e-2, "suspicious"))


def grade(rel: float) -> str:
    """``correct`` < 1e-7 <= ``acceptable`` < 1e-4 <= ``suspicious`` < 1e-2 <= ``wrong``."""
    if not math.isfinite(rel):
        return "wrong"
    for limit, name in GRADES:
        if rel < limit:
            return name
    return "wrong"


def relative_error(a: float, b: float) -> float:
    """|a - b| / (|a| + |b|); 0 when both are 0."""
    den = abs(a) + abs(b)
    if den == 0:
        return 0.0
    return abs(a - b) / den


@dataclass
class Target:
    name: str
    kind: str  # "autograd.Function" | "hooked module" | "named module" | "whole-model directional"
    fn: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module: Any = None
    location: dict | None = None


# --------------------------------------------------------------------------------------
# finding targets


def _dropout_types():
    import torch.nn as nn

    return (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


def _has_backward_hooks(m) -> bool:
    return bool(getattr(m, "_backward_hooks", None)) or bool(getattr(m, "_backward_pre_hooks", None))


def _map_tensors(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts);
    anything else is kept as it is."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _detach(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach().clone())


def _ours(path: str) -> bool:
    """Whether a stack frame belongs to gradaudit itself (never the user's line)."""
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.abspath(path).startswith(here + os.sep)


def find_targets(model, inputs: tuple, names: list[str] | None = None) -> list[Target]:
    """Run one forward pass of ``model`` recording Function calls and module inputs.

    The caller restores the model (``gradaudit.state.preserved``); every patch and hook
    installed here is removed before returning, even when the forward raises.
    """
    import torch
    from torch.autograd.function import Function

    from gradaudit.frontends.fx import user_location
    from gradaudit.frontends.signature import ExampleCall

    names = list(names or [])
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            known = ", ".join(n for n in list(modules)[1:6])
            raise ConfigError(f"--gradcheck-module {name!r}: no such submodule (e.g. {known})")
    hooked = [n for n, m in modules.items() if n and _has_backward_hooks(m)]
    wanted = {n: "named module" for n in names}
    for n in hooked:
        wanted.setdefault(n, "hooked module")
    captured: dict[str, tuple] = {}
    functions: dict[type, Target] = {}
    handles = []

    def pre_hook(name):
        def hook(mod, args, kwargs):
            if name not in captured:
                captured[name] = (_detach(args), _detach(kwargs))
            return None

        return hook

    # a classmethod (torch <= 2.13) or a C classmethod_descriptor (2.14): both bind by __get__
    original = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if cls not in functions and not cls.__module__.startswith("torch"):
            frames = [(f.filename, f.lineno or 0, f.line) for f in traceback.extract_stack() if not _ours(f.filename)]
            loc = user_location(frames)
            functions[cls] = Target(
                name=cls.__qualname__,
                kind="autograd.Function",
                fn=cls.apply,
                args=_detach(args),
                kwargs=_detach(kwargs),
                location=loc.to_json() if loc else None,
            )
        return original.__get__(None, cls)(*args, **kwargs)

    try:
        for name in wanted:
            handles.append(modules[name].register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        Function.apply = classmethod(apply)
        with torch.no_grad():
            ExampleCall.of(inputs)(model)
    finally:
        Function.apply = original
        for h in handles:
            h.remove()
    targets = list(functions.values())
    for name, kind in wanted.items():
        args, kwargs = captured.get(name, ((), {}))
        targets.append(Target(name=name, kind=kind, module=modules[name], args=args, kwargs=kwargs))
    return targets


# --------------------------------------------------------------------------------------
# checking


def _to64(obj: Any, rows: int | None) -> Any:
    """Detached copies of the tensors in ``obj``, floating ones in float64, each cut to its
    first ``rows`` rows (all when None)."""
    import torch

    def one(t):
        t = t.detach()
        if rows is not None and t.dim() >= 1 and t.shape[0] > rows:
            t = t[:rows]
        if t.is_floating_point():
            t = t.to(torch.float64)
        return t.clone()

    return _map_tensors(obj, one)


def _float_leaves(obj: Any, out: list, prefix: str) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            out.append((prefix, obj))
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            _float_leaves(o, out, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, o in obj.items():
            _float_leaves(o, out, f"{prefix}[{k!r}]")


def _outputs(val: Any) -> list:
    """The floating-point tensors in ``val``, in :func:`_float_leaves` order."""
    out: list = []
    _float_leaves(val, out, "")
    return [t for _, t in out]


class _Checked:
    """Entry-wise check of ``call()`` (a closure over tensors that may be perturbed)."""

    def __init__(self, call: Callable[[], Any], tensors: list[tuple[str, Any]]) -> None:
        import torch

        self.call = call
        self.tensors = tensors
        torch.manual_seed(SEED)
        with torch.no_grad():
            base = _outputs(call())
        gen = torch.Generator().manual_seed(SEED)
        self.v = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in base]
        self.base = base

    def evaluate(self) -> list:
        import torch

        torch.manual_seed(SEED)
        with torch.no_grad():
            return _outputs(self.call())

    def analytic(self) -> list:
        import torch

        for _, t in self.tensors:
            t.requires_grad_(True)
        try:
            torch.manual_seed(SEED)
            with torch.enable_grad():
                ys = _outputs(self.call())
                s = sum((y * v).sum() for y, v in zip(ys, self.v) if y.requires_grad)
                if not isinstance(s, torch.Tensor) or not s.requires_grad:
                    return [None] * len(self.tensors)
                grads = torch.autograd.grad(s, [t for _, t in self.tensors], allow_unused=True)
        finally:
            for _, t in self.tensors:
                t.requires_grad_(False)
        return [None if g is None else g.detach() for g in grads]

    def project(self, ys_plus: list, ys_minus: list) -> tuple[float, float]:
        """sum_k v_k (f+_k - f-_k), and the rounding noise scale sum_k |v_k| max|f_k|."""
        total = 0.0
        noise = 0.0
        for yp, ym, v in zip(ys_plus, ys_minus, self.v):
            diff = (yp - ym).double()
            total += float((v * diff).sum())
            noise += float((v.abs() * torch_max_abs(yp, ym) * (diff != 0)).sum())
        return total, noise


def torch_max_abs(a, b):
    import torch

    return torch.maximum(a.abs(), b.abs()).double()


def _kink(fwd: float, bwd: float, resolution: float) -> bool:
    """Whether the one-sided differences disagree by more than ``KINK_TOLERANCE``
    relative (plus the rounding resolution): a kink lies within the step."""
    return abs(fwd - bwd) > KINK_TOLERANCE * (abs(fwd) + abs(bwd)) + resolution


def _indices(numel: int, count: int, seed: int) -> list[int]:
    import torch

    if numel <= count:
        return list(range(numel))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(numel, generator=gen)[:count].tolist())


def check_entries(
    call: Callable[[], Any], tensors: list[tuple[str, Any]], per_tensor: int = ENTRIES_PER_TENSOR
) -> dict:
    """Central differences entry by entry against autograd for ``tensors`` (float64)."""
    import torch

    chk = _Checked(call, tensors)
    grads = chk.analytic()
    entries: list[dict] = []
    kinks: list[dict] = []
    unresolved = 0
    nonfinite = 0
    for k, ((name, t), g) in enumerate(zip(tensors, grads)):
        flat = t.view(-1)
        for i in _indices(t.numel(), per_tensor, SEED + k):
            a = 0.0 if g is None else float(g.reshape(-1)[i])
            x0 = float(flat[i])
            index = [int(j) for j in torch.unravel_index(torch.tensor(i), t.shape)] if t.dim() else []
            kink = None
            for step in STEPS:
                with torch.no_grad():
                    flat[i] = x0 + step
                    plus = chk.evaluate()
                    flat[i] = x0 - step
                    minus = chk.evaluate()
                    flat[i] = x0
                diff, noise = chk.project(plus, minus)
                b = diff / (2 * step)
                fwd = chk.project(plus, chk.base)[0] / step
                bwd = chk.project(chk.base, minus)[0] / step
                resolution = 100 * EPS64 * noise / step
                if _kink(fwd, bwd, resolution):
                    kink = {"tensor": name, "index": index, "value": x0, "left": bwd, "right": fwd, "step": step}
                    continue
                kink = None
                break
            if kink is not None:
                kinks.append(kink)
                continue
            if not math.isfinite(b):
                nonfinite += 1
                continue
            if abs(a) + abs(b) <= resolution:
                unresolved += 1
                continue
            entries.append(
                {"tensor": name, "index": index, "autograd": a, "numeric": b, "rel_error": relative_error(a, b)}
            )
    return _summarise(entries, kinks, unresolved, nonfinite)


def _summarise(entries: list[dict], kinks: list[dict], unresolved: int, nonfinite: int = 0) -> dict:
    """Grade of the worst entry. Entries whose numeric derivative is not finite (the
    function is NaN or inf around the point) are counted, not graded: there is nothing to
    compare the backward with, and the non-finite forward is the probe's finding."""
    entries.sort(key=lambda e: -e["rel_error"] if math.isfinite(e["rel_error"]) else -math.inf)
    worst = max((e["rel_error"] for e in entries), default=0.0)
    if any(not math.isfinite(e["rel_error"]) for e in entries):
        worst = math.inf
    out = {
        "max_rel_error": worst,
        "grade": grade(worst) if entries else ("kink" if kinks else "unchecked"),
        "checked": len(entries),
        "worst": entries[:5],
        "kinks": kinks[:5],
        "kink_count": len(kinks),
        "below_resolution": unresolved,
        "nonfinite": nonfinite,
    }
    if nonfinite and not entries:
        out["note"] = "the output is not finite (NaN or inf) around the checked points: no derivative to compare"
    return out


def _check_recorded(run: Callable[..., Any], target: Target, extra: list, what: str) -> dict:
    """:func:`check_entries` of ``run(*args, **kwargs)`` on the target's recorded input in
    float64 (cut to two samples, or whole when the cut input does not run), for the
    input tensors plus ``extra`` (name, tensor) pairs."""
    import torch

    last_error = None
    for rows in (2, None):
        args = _to64(target.args, rows)
        kwargs = _to64(target.kwargs, rows)
        try:
            torch.manual_seed(SEED)
            with torch.no_grad():
                run(*args, **kwargs)
        except Exception as exc:
            last_error = exc
            continue
        tensors: list = []
        _float_leaves(args, tensors, "input")
        _float_leaves(kwargs, tensors, "input")
        out = check_entries(lambda: run(*args, **kwargs), tensors + extra)
        out["input_shapes"] = [list(t.shape) for _, t in tensors]
        return out
    return _unchecked(f"the {what} could not be run on its recorded input in float64: {_first(last_error)}")


def check_module(target: Target) -> dict:
    """Float64 copy of the module; the recorded input cut to two samples when it runs."""
    mod = copy.deepcopy(target.module)
    mod.double()
    for m in mod.modules():
        if isinstance(m, _dropout_types()):
            m.eval()
    params = [(f"{target.name}.{n}" if target.name else n, p) for n, p in mod.named_parameters()]
    for _, p in params:
        p.requires_grad_(False)
    return _check_recorded(mod, target, params, "module")


def check_function(target: Target) -> dict:
    return _check_recorded(target.fn, target, [], "Function")


def check_directional(model, inputs: tuple, attempts: int = 3) -> dict:
    """<grad s, u> by autograd against a central difference along u, in float64."""
    import torch

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    theta = {n: p.detach().to(torch.float64) if p.is_floating_point() else p.detach() for n, p in params.items()}
    bufs = {
        n: b.detach().clone().to(torch.float64) if b.is_floating_point() else b.detach().clone()
        for n, b in buffers.items()
    }
    from gradaudit.frontends.signature import ExampleCall

    call = ExampleCall.of(inputs).map(lambda t: _to64(t, None))
    xs = call.tensors()
    for m in model.modules():
        if isinstance(m, _dropout_types()):
            m.eval()
    leaves = [(f"param {n}", t) for n, t in theta.items() if t.is_floating_point()]
    leaves += [(f"input[{i}]", x) for i, x in enumerate(xs) if x.is_floating_point()]

    def run(offset: float, u: list | None):
        state = dict(bufs)
        shifted = []
        for (name, t), d in zip(leaves, u or [None] * len(leaves)):
            shifted.append(t if d is None or offset == 0 else t + offset * d)
        k = 0
        params_now = {}
        for n, t in theta.items():
            if t.is_floating_point():
                params_now[n] = shifted[k]
                k += 1
            else:
                params_now[n] = t
        inputs_now = iter(shifted[k:])
        x_now = call.map(lambda x: next(inputs_now) if x.is_floating_point() else x)
        torch.manual_seed(SEED)
        return _outputs(torch.func.functional_call(model, {**params_now, **state}, x_now.args, x_now.kwargs, strict=False))

    with torch.no_grad():
        base = run(0.0, None)
    gen = torch.Generator().manual_seed(SEED)
    v = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in base]
    kinks = []
    for attempt in range(attempts):
        u = []
        for _, t in leaves:
            d = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            scale = float(t.pow(2).mean().sqrt()) if t.numel() else 1.0
            u.append(d * (scale if scale > 0 else 1.0))
        for _, t in leaves:
            t.requires_grad_(True)
        try:
            with torch.enable_grad():
                ys = run(0.0, None)
                s = sum((y * w).sum() for y, w in zip(ys, v) if y.requires_grad)
                grads = torch.autograd.grad(s, [t for _, t in leaves], allow_unused=True)
        finally:
            for _, t in leaves:
                t.requires_grad_(False)
        a = sum(float((g * d).sum()) for g, d in zip(grads, u) if g is not None)
        kink = None
        for step in STEPS:
            with torch.no_grad():
                plus = run(step, u)
                minus = run(-step, u)
            diff = sum(float((w * (p - m)).sum()) for p, m, w in zip(plus, minus, v))
            fwd = sum(float((w * (p - b0)).sum()) for p, b0, w in zip(plus, base, v)) / step
            bwd = sum(float((w * (b0 - m)).sum()) for b0, m, w in zip(base, minus, v)) / step
            noise = sum(float((w.abs() * torch.maximum(p.abs(), m.abs())).sum()) for p, m, w in zip(plus, minus, v))
            b = diff / (2 * step)
            resolution = 100 * EPS64 * noise / step
            if _kink(fwd, bwd, resolution):
                kink = {"tensor": "direction", "index": [attempt], "left": bwd, "right": fwd, "step": step}
                continue
            kink = None
            break
        if kink is not None:
            kinks.append(kink)
            continue
        if not math.isfinite(b):
            return _summarise([], kinks, 0, nonfinite=1)
        entries = [
            {
                "tensor": "direction in parameter and input space",
                "index": [attempt],
                "autograd": a,
                "numeric": b,
                "rel_error": relative_error(a, b),
            }
        ]
        out = _summarise(entries, kinks, 0)
        out["input_shapes"] = [list(x.shape) for x in xs]
        return out
    return _summarise([], kinks, 0)


def _unchecked(note: str) -> dict:
    return {
        "max_rel_error": None,
        "grade": "unchecked",
        "checked": 0,
        "worst": [],
        "kinks": [],
        "kink_count": 0,
        "below_resolution": 0,
        "nonfinite": 0,
        "note": note,
    }


def _first(exc: BaseException | None) -> str:
    if exc is None:
        return "no input was recorded (the module is not called by the model's forward)"
    return first_line(exc)


def gradcheck(model, inputs: tuple, *, modules: list[str] | None = None, device: str = "cpu") -> list[dict]:
    """Check every target; return one dict per target (see the module docstring).

    Numbers stay Python floats, NaN and inf included (a NaN forward gives NaN entries):
    renderers turn them into text, the JSON and SARIF writers into strings."""
    from gradaudit.probe.device import on_device, resolve_device
    from gradaudit.progress import progress
    from gradaudit.state import preserved

    device = resolve_device(device)
    results: list[dict] = []
    with preserved(model):
        targets = find_targets(model, inputs, modules)
        with on_device(model, device), progress(len(targets) + 1, "gradcheck") as step:
            for target in targets:
                step(1, target.name)
                if target.kind == "autograd.Function":
                    res = check_function(_moved(target, device))
                elif not target.args and not target.kwargs:
                    res = _unchecked(_first(None))
                else:
                    res = check_module(_moved(target, device))
                results.append({"target": target.name, "kind": target.kind, "location": target.location, **res})
            step(1, "whole model")
            from gradaudit.frontends.signature import ExampleCall

            res = check_directional(model, ExampleCall.of(inputs).map(lambda t: t.to(device)))
            results.append({"target": "model", "kind": "whole-model directional", "location": None, **res})
    return results


def _moved(target: Target, device: str) -> Target:
    def mv(obj):
        return _map_tensors(obj, lambda t: t.to(device))

    return Target(
        target.name, target.kind, target.fn, mv(target.args), mv(target.kwargs), target.module, target.location
    )
