"""Independent measurement of per-node activation and gradient RMS with real autograd.

This module shares nothing with gradaudit's propagation: it runs the real model on
Gaussian inputs and differentiates it. It borrows gradaudit's fx tracer only so that
its node names match the names the audit reports.

    L = sum over every floating output y of <y, g>,  g ~ N(0, 1) per element

(the definition of L in DESIGN.md). For every fx node with a floating tensor output we
return sqrt(E[y^2]) and sqrt(E[(dL/dy)^2]), the expectations being means over the
tensor's elements and over ``draws`` independent draws of the input and of g.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from gradaudit.frontends.fx import _Tracer
from gradaudit.state import preserved

_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` may write into one of its inputs (``ReLU(inplace=True)``, ``x += y``,
    ``x.relu_()``)."""
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(str(n.target)), "inplace", False))
    if n.op == "call_function":
        return n.target in _INPLACE_FUNCS or bool(n.kwargs.get("inplace", False))
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.startswith("_")
    return False


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's output tensor(s).

    Inputs of in-place nodes are cloned first, so the tensor kept for a node is the
    value that node produced, not a later in-place overwrite of it.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, list[torch.Tensor | None]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if _is_inplace(self.module, n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            args = fx.node.map_aggregate(args, clone)
            kwargs = fx.node.map_aggregate(kwargs, clone)
            result = getattr(self, n.op)(n.target, args, kwargs)
        else:
            result = super().run_node(n)
        if n.op not in ("output", "get_attr"):
            leaves: list[torch.Tensor | None] = []
            _flatten(result, leaves)
            self.values[n.name] = leaves
        return result


def _flatten(val: Any, out: list) -> None:
    if isinstance(val, (tuple, list)):
        for v in val:
            _flatten(v, out)
    else:
        out.append(val if isinstance(val, torch.Tensor) and val.is_floating_point() else None)


def graph_module(model: nn.Module) -> fx.GraphModule:
    """The model traced with gradaudit's tracer (same leaves, same node names)."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _draw_inputs(inputs: tuple, gen: torch.Generator, redraw: bool = True) -> tuple:
    """Floating inputs are redrawn N(0, 1) per element (or, with ``redraw=False``, used
    as given); integer inputs (token ids) are used as given."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = torch.randn(x.shape, generator=gen, dtype=x.dtype) if redraw else x.detach().clone()
            out.append(x.requires_grad_(True))
        else:
            out.append(x)
    return tuple(out)


def measure(
    model: nn.Module, inputs: Any, seed: int = 0, draws: int = 1, leaf: int = 0, redraw: bool = True
) -> dict[str, tuple[float, float]]:
    """``{node name: (act_rms, grad_rms)}`` measured with real autograd.

    Averages second moments over ``draws`` independent draws of (inputs, g). The model
    runs in whatever mode it is in (training mode: BatchNorm uses batch statistics,
    dropout is active); its buffers, ``.grad`` and the global RNG states are restored
    afterwards, and gradients are taken with ``torch.autograd.grad`` so no parameter's
    ``.grad`` is touched. Values that do not require grad (``detach``) get a gradient
    RMS of 0. ``leaf`` selects which output of a tuple-valued node (``nn.LSTM``,
    ``nn.MultiheadAttention``) is reported. ``redraw=False`` keeps the given floating
    inputs (only g and dropout masks are drawn).
    """
    return {k: (v[0], v[1]) for k, v in measure_moments(model, inputs, seed, draws, leaf, redraw).items()}


def measure_moments(
    model: nn.Module, inputs: Any, seed: int = 0, draws: int = 1, leaf: int = 0, redraw: bool = True
) -> dict[str, tuple[float, float, float]]:
    """Like :func:`measure`, with the mean: ``{node: (act_rms, grad_rms, mean)}``."""
    inputs = inputs if isinstance(inputs, tuple) else (tuple(inputs) if isinstance(inputs, list) else (inputs,))
    sums: dict[str, list[float]] = {}
    with preserved(model):
        gm = graph_module(model)
        for d in range(draws):
            gen = torch.Generator().manual_seed(seed * 1000 + d)
            torch.manual_seed(seed * 1000 + d + 7)  # dropout masks; restored on exit
            x = _draw_inputs(inputs, gen, redraw)
            rec = _Recorder(gm)
            with torch.enable_grad():
                outputs = rec.run(*x)
                outs: list = []
                _flatten(outputs, outs)
                loss = torch.zeros((), dtype=torch.float64)
                for y in outs:
                    if y is not None and y.requires_grad:
                        g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
                        loss = loss + (y * g).sum().double()
                names, tensors = [], []
                for name, leaves in rec.values.items():
                    t = leaves[leaf] if leaf < len(leaves) else None
                    if t is not None:
                        names.append(name)
                        tensors.append(t)
                needs = [t for t in tensors if t.requires_grad]
                found = iter(torch.autograd.grad(loss, needs, allow_unused=True) if needs else ())
                grads = [next(found) if t.requires_grad else None for t in tensors]
            for name, t, g in zip(names, tensors, grads):
                td = t.detach().double()
                acc = sums.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += float(td.pow(2).mean())
                acc[1] += 0.0 if g is None else float(g.detach().double().pow(2).mean())
                acc[2] += float(td.mean())
    return {name: ((a / draws) ** 0.5, (g / draws) ** 0.5, m / draws) for name, (a, g, m) in sums.items()}


def measure_over_time(run, make_input, *, time_axis: int = 0, draws: int = 4, seed: int = 0) -> list[float]:
    """RMS of dL/dx_t over the batch and features, relative to the last step, for
    L = <y_T, g> (g ~ N(0, 1)): ``run(x)`` returns y_T, the output at the last step
    only; ``make_input(gen)`` draws a fresh input sequence x. Second moments are
    averaged over ``draws`` draws of x and g, in float64 (a curve spans many decades)."""
    gen = torch.Generator().manual_seed(seed)
    total = None
    for _ in range(draws):
        x = make_input(gen).detach().requires_grad_(True)
        with torch.enable_grad():
            y = run(x)
            g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
            (gx,) = torch.autograd.grad(y, x, g)
        sq = gx.double().pow(2).movedim(time_axis, 0)
        sq = sq.reshape(sq.shape[0], -1).mean(dim=1)
        total = sq if total is None else total + sq
    rms = (total / draws).sqrt()
    return [float(v / rms[-1]) for v in rms]


def measure_hidden_over_time(module: nn.Module, make_input, *, draws: int = 4, seed: int = 0) -> list[float]:
    """RMS of dL/dh_t over the batch and units, relative to the last step, for
    L = <h_T, g> (g ~ N(0, 1)) and a unidirectional ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``
    of the top layer's hidden state: the module is called one step at a time on its own
    returned state, so every h_t is a tensor of the autograd graph and its gradient
    (``torch.autograd.grad``: no ``.grad`` is written) is the total one, through the
    recurrence (for an LSTM, at h_t only, the cell state being a separate tensor).
    ``make_input(gen)`` draws a fresh (T, B, n_in) sequence."""
    gen = torch.Generator().manual_seed(seed)
    total = None
    for _ in range(draws):
        x = make_input(gen).detach()
        hidden: list[torch.Tensor] = []
        state = None
        with torch.enable_grad():
            for t in range(x.shape[0]):
                _, state = module(x[t : t + 1], state)
                hidden.append(state[0] if isinstance(state, tuple) else state)
            g = torch.randn(hidden[-1][-1].shape, generator=gen, dtype=hidden[-1].dtype)
            grads = torch.autograd.grad(hidden[-1][-1], hidden, g)
        sq = torch.stack([gh[-1].double().pow(2).mean() for gh in grads])
        total = sq if total is None else total + sq
    rms = (total / draws).sqrt()
    return [float(v / rms[-1]) for v in rms]


def measure_modules(model: nn.Module, inputs: Any, seed: int = 0, draws: int = 1) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(module name, call index): (act_rms, grad_rms)}`` of every call of every module
    that owns parameters, measured with forward hooks and real autograd.

    Works on any model that runs (no tracing at all): the reference for models that only
    ``torch.export`` or the hook capture can take. ``inputs`` is a tensor, a tuple
    (positional) or a dict (keyword). The first floating tensor of a module's output is
    the one measured (an LSTM's ``output``). L is the same as :func:`measure`'s.
    """
    from gradaudit.frontends.outputs import flatten_outputs

    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (
        (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}
    )
    owners = {m: name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    sums: dict[tuple[str, int], list[float]] = {}
    with preserved(model):
        model.train()
        for d in range(draws):
            gen = torch.Generator().manual_seed(seed * 1000 + d)
            torch.manual_seed(seed * 1000 + d + 7)
            calls: dict[str, int] = {}
            seen: list[tuple[tuple[str, int], torch.Tensor]] = []

            def hook(mod, _args, out):
                name = owners[mod]
                k = calls.get(name, 0)
                calls[name] = k + 1
                leaves, _ = flatten_outputs(out)
                first = next((t for t in leaves if t.is_floating_point()), None)
                if first is not None:
                    seen.append(((name, k), first))

            handles = [m.register_forward_hook(hook) for m in owners]
            try:
                x_args = tuple(_draw_inputs(args, gen))
                x_kwargs = dict(zip(kwargs, _draw_inputs(tuple(kwargs.values()), gen)))
                with torch.enable_grad():
                    out = model(*x_args, **x_kwargs)
            finally:
                for h in handles:
                    h.remove()
            with torch.enable_grad():
                outs, _ = flatten_outputs(out)
                loss = torch.zeros((), dtype=torch.float64)
                for y in outs:
                    if y.is_floating_point() and y.requires_grad:
                        loss = loss + (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum().double()
                needs = [t for _, t in seen if t.requires_grad]
                found = iter(torch.autograd.grad(loss, needs, allow_unused=True) if needs else ())
            for key, t in seen:
                g = next(found) if t.requires_grad else None
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(t.detach().double().pow(2).mean())
                acc[1] += 0.0 if g is None else float(g.double().pow(2).mean())
    return {k: ((a / draws) ** 0.5, (g / draws) ** 0.5) for k, (a, g) in sums.items()}
