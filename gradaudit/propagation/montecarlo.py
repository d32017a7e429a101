"""Local Monte Carlo estimate for ops no handler models.

The op is run once, on its own, on Gaussian inputs with the predicted mean and variance
and the node's real shapes; the output's moments are measured, and a backward pass with
an N(0, 1) cotangent on each output measures the vector-Jacobian gain into each input.
Parameters are read, never written: gradients are taken with ``torch.autograd.grad``
with respect to the sampled inputs only, so no ``.grad`` is touched. Every estimated
node is listed in the report.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradaudit.ir import callable_of, Node, Ref, Stats, map_refs
from gradaudit.propagation.handlers import Effect, _stats

SEED = 1234


def estimate(node: Node, engine) -> Effect:
    """Run ``node.fn`` on sampled inputs; raise ``RuntimeError`` when it cannot run."""
    if node.fn is None:
        raise RuntimeError("the node has no callable")
    gen = torch.Generator().manual_seed(SEED)
    leaves: list[tuple[str, int, torch.Tensor]] = []

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
                return torch.zeros(meta.shape, dtype=dtype)
            if s is None:
                raise RuntimeError(f"input '{ref.name}' has no statistics")
            x = s.mean + math.sqrt(s.var) * torch.randn(meta.shape, generator=gen, dtype=torch.float32)
            x = x.to(dtype).requires_grad_(True)
            leaves.append((ref.name, structure, x))
            return x

        return build(src.structure)

    args = map_refs(node.args, sample)
    kwargs = map_refs(node.kwargs, sample)
    with torch.enable_grad():
        out = callable_of(node)(*args, **kwargs)
    outs: list[Any] = []
    _flatten(out, outs)
    stats: list[Stats | None] = []
    for y in outs:
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            yd = y.detach().double()
            st = Stats(mean=float(yd.mean()), m2=float(yd.pow(2).mean()), estimated=True)
            st.positive = bool((yd >= 0).all()) and st.var > 0  # a variance, a norm: never below 0
            stats.append(st)
        else:
            stats.append(None)
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


def _mark(s: Stats) -> Stats:
    out = _stats(s.mean, s.m2)
    out.estimated, out.positive = True, s.positive
    return out


def _flatten(val: Any, leaves: list) -> None:
    if isinstance(val, (tuple, list)):
        for v in val:
            _flatten(v, leaves)
    else:
        leaves.append(val)
