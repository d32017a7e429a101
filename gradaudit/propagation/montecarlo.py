"""Local Monte Carlo estimate for ops no handler models.

The op is run once, on its own, on Gaussian inputs with the predicted mean and variance
and the node's real shapes (integer inputs the model computes, whose values are unknown
before it runs, as zeros: when that makes nonzero inputs give an all-zero output, there
is no estimate, and the coverage check says so); the output's moments are measured, and a backward pass with
an N(0, 1) cotangent on each output measures the vector-Jacobian gain into each input.
Parameters are read, never written: gradients are taken with ``torch.autograd.grad``
with respect to the sampled inputs only, so no ``.grad`` is touched. An op computed
outside autograd (an ONNX node run by onnxruntime: ``fn.autograd`` is False) gets its
gains from forward differences instead (:func:`_difference_gains`). Every estimated
node is listed in the report.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradaudit.ir import callable_of, iter_refs, Node, Ref, Stats, map_refs
from gradaudit.propagation.ops.base import Effect, make_stats

SEED = 1234


def estimate(node: Node, engine) -> Effect:
    """Run ``node.fn`` on sampled inputs; raise ``RuntimeError`` when it cannot run."""
    if node.fn is None:
        raise RuntimeError("the node has no callable")
    gen = torch.Generator().manual_seed(SEED)
    leaves: list[tuple[str, int, torch.Tensor]] = []
    guessed: list[str] = []  # integer inputs computed in the run: sampled as zeros

    def sample(ref: Ref) -> Any:
        src = engine.graph[ref.name]
        if src.op == "param":
            return src.params.get("value")

        def build(structure: Any) -> Any:
            if isinstance(structure, tuple):
                return tuple(build(s) for s in structure)
            meta = src.outputs[structure]
            if meta is None:
                raise RuntimeError(f"input '{ref.name}' is not a tensor")
            dtype = getattr(torch, meta.dtype)
            s = engine.leaf_stats(ref.name, structure)
            if not meta.is_float:
                guessed.append(ref.name)
                return torch.zeros(meta.shape, dtype=dtype)
            if s is None:
                raise RuntimeError(f"input '{ref.name}' has no statistics")
            x = s.mean + math.sqrt(s.var) * torch.randn(meta.shape, generator=gen, dtype=torch.float32)
            x = x.to(dtype).requires_grad_(True)
            leaves.append((ref.name, structure, x))
            return x

        return build(src.structure)

    names = list(dict.fromkeys(r.name for r in iter_refs((node.args, node.kwargs))))
    derived = _derived(names, engine.graph)
    values: dict[str, Any] = {name: sample(Ref(name)) for name in names if name not in derived}
    with torch.enable_grad():
        for name, src in derived.items():
            try:
                values[name] = callable_of(src)(*map_refs(src.args, lambda r: values[r.name]),
                                                **map_refs(src.kwargs, lambda r: values[r.name]))
            except Exception:  # noqa: BLE001 - not computable from the samples: sampled itself
                values[name] = sample(Ref(name))
        args = map_refs(node.args, lambda r: values[r.name])
        kwargs = map_refs(node.kwargs, lambda r: values[r.name])
        out = callable_of(node)(*args, **kwargs)
    outs: list[Any] = []
    _flatten(out, outs)
    floats = [y for y in outs if isinstance(y, torch.Tensor) and y.is_floating_point()]
    if guessed and floats and not any(bool(y.detach().ne(0).any()) for y in floats) and any(
        bool(x.detach().ne(0).any()) for _, _, x in leaves
    ):
        # offsets, counts or indices computed by the model (a mixture of experts' routing):
        # zeros in their place made nonzero inputs give nothing, which is no estimate
        raise RuntimeError(
            f"its result depends on integer inputs the model computes ({', '.join(dict.fromkeys(guessed))}), "
            "whose values are known only when it runs; sampled as zeros they make the output all zero"
        )
    stats: list[Stats | None] = []
    for y in outs:
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            yd = y.detach().double()
            st = Stats(mean=float(yd.mean()), m2=float(yd.pow(2).mean()), estimated=True)
            st.positive = bool((yd >= 0).all()) and st.var > 0  # a variance, a norm: never below 0
            stats.append(st)
        else:
            stats.append(None)
    if not getattr(node.fn, "autograd", True):
        gains = _difference_gains(callable_of(node), args, kwargs, leaves, outs, gen)
        return Effect([None if s is None else _mark(s) for s in stats], gains)
    gains: list[tuple[str, int, int, float]] = []
    inputs = [x for _, _, x in leaves]
    for k, y in enumerate(outs):
        if not (isinstance(y, torch.Tensor) and y.requires_grad and inputs):
            continue
        cot = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.dtype)
        try:
            grads = torch.autograd.grad(y, inputs, cot, retain_graph=True, allow_unused=True)
        except RuntimeError:  # a draw (bernoulli_ of DropPath): no derivative, no gradient to pass back
            grads = [None] * len(inputs)
        for (name, leaf, x), g in zip(leaves, grads):
            gain = 0.0 if g is None else float(g.detach().double().pow(2).mean())
            gains.append((name, leaf, k, gain))
    return Effect([None if s is None else _mark(s) for s in stats], gains)


def _derived(names: list[str], graph) -> dict[str, Node]:
    """The inputs of a node that are computed from its other inputs alone, by a function
    call (``a / a.sum(-1, keepdim=True)``, a mixture of experts' renormalised top-k
    weights: the sum is a function of ``a``), with the nodes computing them. Sampled
    apart, such an input would be independent of the ones it is made of, and the
    Jacobian would lose what the two paths cancel (the renormalisation's backward
    removes the gradient's component along the weights); computed from their samples,
    the backward runs through both paths into the inputs they come from, and the
    derived input gets no gain of its own."""
    out: dict[str, Node] = {}
    for name in names:
        src = graph[name]
        ins = src.inputs
        if (src.kind in ("call_function", "call_method") and src.fn is not None and not src.tuple_output and ins
                and all(i in names and i != name and i not in out for i in ins)):
            out[name] = src
    return out


def _difference_gains(fn, args, kwargs, leaves, outs: list, gen) -> list[tuple[str, int, int, float]]:
    """Gains of an op without autograd, by central differences along random directions.

    The autograd estimate above is mean((J^T g)^2) over the input's n elements for
    g ~ N(0, I), whose expectation is ||J||_F^2 / n. For v ~ N(0, I) on the input,
    E||J v||^2 = ||J||_F^2 too (Hutchinson 1990), and J v = (f(x + h v) - f(x - h v)) / 2h
    up to O(h^2); h is 1e-3 of the input's RMS, so each element moves by about 1e-3 of
    its size. One direction per input, like the one cotangent of the autograd estimate.
    """
    gains = []
    for name, leaf, x in leaves:
        xd = x.detach()
        v = torch.randn(xd.shape, generator=gen, dtype=torch.float32).to(xd.dtype)
        h = 1e-3 * max(float(xd.double().pow(2).mean().sqrt()), 1e-6)
        moved = []
        for sign in (1.0, -1.0):
            shifted = (xd + sign * h * v).to(xd.dtype)
            with torch.no_grad():
                out = fn(*_swap(args, x, shifted), **_swap(kwargs, x, shifted))
            flat: list[Any] = []
            _flatten(out, flat)
            moved.append(flat)
        for k, (yp, ym) in enumerate(zip(*moved)):
            if isinstance(yp, torch.Tensor) and yp.is_floating_point() and isinstance(outs[k], torch.Tensor):
                jv = (yp.double() - ym.double()) / (2 * h)
                gains.append((name, leaf, k, float(jv.pow(2).sum()) / max(xd.numel(), 1)))
    return gains


def _swap(obj: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``obj`` with the tensor ``old`` (by identity) replaced by ``new``."""
    if obj is old:
        return new
    if isinstance(obj, tuple):
        return tuple(_swap(o, old, new) for o in obj)
    if isinstance(obj, list):
        return [_swap(o, old, new) for o in obj]
    if isinstance(obj, dict):
        return {k: _swap(v, old, new) for k, v in obj.items()}
    return obj


def _mark(s: Stats) -> Stats:
    out = make_stats(s.mean, s.m2)
    out.estimated, out.positive = True, s.positive
    return out


def _flatten(val: Any, leaves: list) -> None:
    if isinstance(val, (tuple, list)):
        for v in val:
            _flatten(v, leaves)
    else:
        leaves.append(val)
