"""Stacks of layers that start with identical weights: their backward, evaluated.

``nn.TransformerEncoder(layer, N)`` (and ``nn.TransformerDecoder``, and any
``copy.deepcopy`` of one block N times) builds its N layers as *deep copies* of one
layer: every block starts with the same weights. The moment propagation treats the
weights of different layers as independent draws, so the gradient's second moment
after k blocks is the product of k per-block gains. With one matrix J repeated, the
gradient after k blocks is (J^T)^k g: it aligns with J's dominant directions, and its
size follows J's eigenvalues rather than the mean square of its singular values (for a
Gaussian matrix, E||W^k g||^2 / ||g||^2 grows like k + 1 where independent draws give
1; Ginibre, J. Math. Phys. 1965). The forward state repeats too: every block applies the
same map, so the tokens of a sequence drift together in a way per-channel moments do
not describe. A 24-layer Post-LN ``nn.TransformerEncoder`` at d 128 has a real gradient
that falls 10x over the top 12 layers and then grows back 5x toward the input, where
independent layers would fall 760x.

No closed form covers this, so such a stack is evaluated numerically, as an unknown op
is (:mod:`~gradaudit.propagation.montecarlo`): its nodes run in order on a sample of
the stack's input drawn from its predicted per-channel law (the example's shape), a
cotangent with unit variance enters at its output, and one backward gives E[g^2] at
every node inside. The predicted gradient at the output is kept; each node inside gets
it times the measured ratio E[g_node^2] / E[g_out^2], and every node upstream of the
stack's input the same ratio at the input (the stack's input must be a cut: everything
upstream reaches the loss only through it). The model's own modules run, in the mode
the model is in, under a forked RNG seeded with :data:`SEED` (the caller's RNG state is
untouched), averaged over :data:`DRAWS` draws of input and cotangent; no ``.grad`` is
written.

Identical means bitwise equal values in separate storage: a deep copy. Layers that
share one tensor object are left alone (weight sharing such as ALBERT's is not
modelled, and the meta stand-in of :mod:`~gradaudit.frontends.meta` shares one draw
between identical blocks to stand for independent draws).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.ir import Graph, Node, Ref, Stats, callable_of, in_place, map_refs

SEED = 4321
DRAWS = 16
#: Fewest identical layers that make a stack.
MIN_BLOCKS = 2

_INDEXED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass
class TiedStack:
    """``blocks`` consecutive layers ``container.0`` ... with identical weights."""

    container: str
    blocks: int
    input: str
    output: str
    nodes: list[str] = field(default_factory=list)
    #: measured E[g_in^2] / E[g_out^2] across the stack, and what the moments predicted
    measured_gain: float = math.nan
    predicted_gain: float = math.nan


def find(graph: Graph) -> list[TiedStack]:
    """The stacks of deep-copied layers in ``graph`` whose nodes form one chain (one
    input from outside, one output used outside)."""
    blocks: dict[str, dict[int, list[Node]]] = {}
    for node in graph:
        if not node.params or not node.module:
            continue
        m = _INDEXED.match(node.module)
        if m is not None:
            blocks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(node)
    stacks = []
    for container, by_index in blocks.items():
        indices = sorted(by_index)
        if len(indices) < MIN_BLOCKS or indices != list(range(indices[0], indices[0] + len(indices))):
            continue
        if not all(_same_weights(by_index[indices[0]], by_index[i]) for i in indices[1:]):
            continue
        stack = _chain(graph, container, indices)
        if stack is not None:
            stacks.append(stack)
    return stacks


def _same_weights(a: list[Node], b: list[Node]) -> bool:
    """Whether two blocks' weight nodes match op for op with equal values in separate storage."""
    if len(a) != len(b):
        return False
    separate = False
    for na, nb in zip(a, b):
        if na.op != nb.op or sorted(na.params) != sorted(nb.params):
            return False
        for key, ta in na.params.items():
            tb = nb.params[key]
            if not isinstance(ta, torch.Tensor) or not isinstance(tb, torch.Tensor):
                if ta is not tb and ta != tb:
                    return False
                continue
            if ta.shape != tb.shape or ta.dtype != tb.dtype or ta.is_meta or tb.is_meta or ta.layout != torch.strided:
                return False
            try:
                if ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr():
                    return False  # shared storage: a tied parameter or the meta stand-in's shared draw
                if not torch.equal(ta, tb):
                    return False
            except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
                return False
            separate = separate or ta.numel() > 1
    return separate


def _chain(graph: Graph, container: str, indices: list[int]) -> TiedStack | None:
    """The node range from the first block's first node to the last block's last, when
    it reads one non-constant value from before it and one of its values is used after."""
    prefixes = tuple(f"{container}.{i}" for i in indices)
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    inside = [k for k, n in enumerate(graph.nodes) if n.module and (n.module in prefixes or n.module.startswith(tuple(p + "." for p in prefixes)))]
    lo, hi = min(inside), max(inside)
    members = {n.name for n in graph.nodes[lo : hi + 1]}
    # the last block's own functional tail (a Pre-LN block's final residual sum)
    while hi + 1 < len(graph.nodes) and not graph.nodes[hi + 1].module and graph.nodes[hi + 1].op != "output":
        nxt = graph.nodes[hi + 1]
        if not all(src in members or graph[src].op == "param" for src in nxt.inputs):
            break
        hi += 1
        members.add(nxt.name)
    names = [n.name for n in graph.nodes[lo : hi + 1]]
    sources = {src for name in names for src in graph[name].inputs if src not in members and graph[src].op != "param"}
    used_after = {name for name in names if any(order[u.name] > hi for u in graph.users(name))}
    if len(sources) != 1 or len(used_after) != 1:
        return None
    return TiedStack(container, len(indices), sources.pop(), used_after.pop(), names)


def evaluate(graph: Graph, stats: dict[str, list[Stats | None]], stack: TiedStack) -> dict[str, float] | None:
    """E[g^2] at every floating value of the stack (and its input) per unit E[g^2] at
    its output, averaged over :data:`DRAWS` sampled runs; None when the stack cannot run."""
    src = graph[stack.input]
    s = _first(stats, stack.input)
    if s is None or src.meta is None or not src.meta.is_float or src.structure != 0:
        return None
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        gen = torch.Generator().manual_seed(SEED)
        for _ in range(DRAWS):
            got = _run_once(graph, stack, s, gen)
            if got is None:
                return None
            for k, v in got.items():
                sums[k] = sums.get(k, 0.0) + v
    out = sums.get(stack.output, 0.0)
    if not out > 0:
        return None
    return {k: v / out for k, v in sums.items()}


def _run_once(graph: Graph, stack: TiedStack, s: Stats, gen: torch.Generator) -> dict[str, float] | None:
    meta = graph[stack.input].meta
    x = _sample(s, meta.shape, gen).to(getattr(torch, meta.dtype)).requires_grad_(True)
    vals: dict[str, Any] = {stack.input: x}

    def value(ref: Ref) -> Any:
        if ref.name in vals:
            return vals[ref.name]
        node = graph[ref.name]
        if node.op == "param":
            return node.params.get("value")
        raise KeyError(ref.name)

    def copy(ref: Ref) -> Any:
        v = value(ref)
        return v.clone() if isinstance(v, torch.Tensor) else v

    with torch.enable_grad():
        try:
            for name in stack.nodes:
                node = graph[name]
                # an in-place op (ReLU(inplace=True)) gets copies: each node keeps its own value
                fetch = copy if in_place(node) else value
                vals[name] = callable_of(node)(*map_refs(node.args, fetch), **map_refs(node.kwargs, fetch))
        except Exception:  # noqa: BLE001 - a stack that does not run alone is left to the moments
            return None
        y = vals[stack.output]
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return None
        names = [stack.input] + [n for n in stack.nodes if isinstance(vals[n], torch.Tensor) and vals[n].requires_grad]
        cot = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.dtype)
        grads = torch.autograd.grad(y, [vals[n] for n in names], cot, allow_unused=True)
    return {n: (0.0 if g is None else float(g.detach().double().pow(2).mean())) for n, g in zip(names, grads)}


def _sample(s: Stats, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Gaussian values with ``s``'s per-channel means and variances (its tensor-wide
    ones when it tracks no channels)."""
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    if not s.has_channels:
        return (s.mean + math.sqrt(max(s.var, 0.0)) * z).float()
    mean, var = s.channels(s.axis, s.ch_mean.numel())
    view = [1] * len(shape)
    view[s.axis] = -1
    return (mean.view(view) + var.clamp_min(0.0).sqrt().view(view) * z).float()


def apply(graph: Graph, stats: dict[str, list[Stats | None]]) -> list[TiedStack]:
    """Evaluate every tied stack of ``graph`` and rescale the predicted gradients inside
    it and upstream of it (``stats`` after the backward pass); the stacks evaluated."""
    done = []
    for stack in find(graph):
        up = upstream(graph, stack)
        out_s, in_s = _first(stats, stack.output), _first(stats, stack.input)
        if up is None or out_s is None or in_s is None or not out_s.g2 > 0 or not in_s.g2 > 0:
            continue
        ratios = evaluate(graph, stats, stack)
        if ratios is None:
            continue
        stack.measured_gain, stack.predicted_gain = ratios[stack.input], in_s.g2 / out_s.g2
        for name in stack.nodes:
            s, r = _first(stats, name), _ratio(graph, ratios, name)
            if s is not None and r is not None and s.g2 > 0:
                s.scale_grad(r * out_s.g2 / s.g2)
        factor = stack.measured_gain / stack.predicted_gain
        for name in [stack.input] + up:
            for s in stats.get(name, []):
                if s is not None:
                    s.scale_grad(factor)
        done.append(stack)
    return done


def _first(stats: dict[str, list[Stats | None]], name: str) -> Stats | None:
    found = stats.get(name)
    return found[0] if found else None


def _ratio(graph: Graph, ratios: dict[str, float], name: str) -> float | None:
    """The measured ratio of a node; for a tuple-valued node (``nn.MultiheadAttention``)
    that of the ``getitem`` taking its first leaf."""
    if name in ratios:
        return ratios[name]
    for u in graph.users(name):
        if u.op == "getitem" and len(u.args) > 1 and u.args[1] == 0 and u.name in ratios:
            return ratios[u.name]
    return None


def upstream(graph: Graph, stack: TiedStack) -> list[str] | None:
    """The nodes whose gradient reaches the outputs only through the stack's input (its
    ancestors), or None when one of them also feeds something else."""
    seen, todo = {stack.input}, [stack.input]
    while todo:
        for src in graph[todo.pop()].inputs:
            if src not in seen and graph[src].op != "param":
                seen.add(src)
                todo.append(src)
    for name in seen:
        if name == stack.input:
            continue
        if any(u.name not in seen for u in graph.users(name)):
            return None
    if any(u.name not in set(stack.nodes) for u in graph.users(stack.input)):
        return None
    return list(seen - {stack.input})
