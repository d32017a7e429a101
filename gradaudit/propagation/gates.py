"""Zero- and small-initialised gates: factors a design closes on purpose at step 0.

Several well-known designs start a factor at (or near) zero so that a block begins as
the identity, or a head begins silent, and train from there:

- a zero-initialised classification head (torchvision's ``vit_b_16``): every gradient
  behind it is exactly 0 at step 0, and becomes non-zero after the first update of the
  head;
- layer scale (CaiT, ConvNeXt: ``gamma * f(x)`` with gamma = 1e-6), SkipInit (a scalar
  alpha = 0 on each residual branch; De & Smith 2020), ReZero (Bachlechner et al. 2020);
- the last convolution or BatchNorm gamma of each residual branch set to zero (Fixup,
  Zhang et al. 2019; Goyal et al. 2017 for the zero-gamma BN);
- adaLN-Zero (DiT, Peebles & Xie 2023): the modulation layer that produces each block's
  shift, scale and gate is zero-initialised.

Judging vanishing on the exact zeros such a design produces would call every one of
these models broken. Instead :func:`find` lists the gates, and :func:`open_gates`
re-propagates the graph with each gate *opened* to a unit-gain value — a closed weight
layer gets LeCun-normal weights (n Var[w] = 1), a closed elementwise scale or norm gamma
gets 1 — which is the gradient that flows once the first updates have opened them. The
vanishing/exploding rules read that opened profile (and say so); an info finding
(GA205) explains each gate. The user's tensors are never modified: opening works on
copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradaudit.frontends.patterns import PRODUCTS, RELAYOUT, parameter_node

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Graph
    from gradaudit.propagation.engine import Analysis

#: An elementwise scale whose largest |value| is at most this is a closed gate (layer
#: scale starts at 1e-6..1e-4; SkipInit / ReZero at 0).
SMALL_SCALE = 1e-3
#: Ops whose weight matrix may be zero-initialised on purpose.
_WEIGHT_OPS = frozenset({"linear", "conv", "conv_transpose"})
_NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
_SCALE_OPS = frozenset({"mul"})


@dataclass
class Gate:
    """One closed factor: the node that applies it and which parameter holds it."""

    node: str  # the node the gate acts at (the weight layer, the norm, or the mul)
    param_node: str | None  # the ``param`` node holding the factor (functional use), else None
    param: str  # the parameter's name on the node (``weight``) or the param node's target
    kind: str  # "zero-weight", "small-scale", "zero-norm-gamma"
    scale: float  # largest |value| of the factor
    module: str | None = None


#: Ops that combine a gated branch with something else: where a closed gate is harmless.
_COMBINE = frozenset({"add", "sub", "mul", "addcmul", "output"})
#: Ops a value passes through on its way to being combined (no weight, no mixing).
_PASS = frozenset({
    "identity", "dropout", "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "to",
    "getitem", "squeeze", "unsqueeze", "clone", "chunk", "split", "unbind", "expand", "drop_path", "stochastic_depth",
    "module", "reshape_as", "view_as", "expand_as", "type_as",
})


def _feeds_a_combination(graph: Graph, name: str) -> bool:
    """Whether the value of ``name`` reaches an add/mul (a residual sum, a gate, a
    modulation) or the output before any weight layer or normalization: a closed factor
    there silences one branch; anywhere else it cuts the network (GA204's case)."""
    stack, seen = [name], set()
    while stack:
        cur = stack.pop()
        for user in graph.users(cur):
            if user.name in seen:
                continue
            seen.add(user.name)
            if user.op in _COMBINE:
                return True
            if user.op in _PASS:
                stack.append(user.name)
    return False


def _all_zero(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is 0 (a look at the first entries settles the usual,
    random weight without scanning millions of them)."""
    flat = t.detach().reshape(-1)
    return not bool(flat[:64].any()) and not bool(flat.any())


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


#: Ops that only re-lay out a parameter on its way to where it acts (``gamma.view(1, -1, 1, 1)``).
_LAYOUT = frozenset({
    "view", "reshape", "unsqueeze", "squeeze", "expand", "to", "flatten", "permute", "transpose", "contiguous",
    "reshape_as", "view_as", "expand_as", "type_as", "clone",
})


def _acting_on(graph: Graph, name: str) -> list[Node]:
    """The nodes a parameter acts in, looking through layout ops."""
    out, stack = [], [name]
    while stack:
        for user in graph.users(stack.pop()):
            if user.op in _LAYOUT:
                stack.append(user.name)
            else:
                out.append(user)
    return out


def find(analysis: Analysis) -> list[Gate]:
    """Every closed gate of ``analysis.graph`` (see the module docstring)."""
    graph = analysis.graph
    gates: list[Gate] = []
    for n in graph:
        if n.kind == "call_module" and n.op in _WEIGHT_OPS:
            w = n.params.get("weight")
            if (isinstance(w, torch.Tensor) and w.dim() >= 2 and w.numel() and _all_zero(w)
                    and _feeds_a_combination(graph, n.name)):
                gates.append(Gate(n.name, None, "weight", "zero-weight", 0.0, n.module))
        elif n.kind != "get_attr" and n.params and (n.op in _WEIGHT_OPS or n.op in PRODUCTS):
            # a functional layer (a hand-written LoRA's ``x @ self.B.t()`` with B = 0)
            w = n.params.get("weight")
            p = _weight_node(graph, n, w)
            if (p is not None and isinstance(w, torch.Tensor) and w.dim() >= 2 and w.numel() and _all_zero(w)
                    and _feeds_a_combination(graph, n.name)):
                gates.append(Gate(n.name, p.name, p.module or p.name, "zero-weight", 0.0, n.module))
        elif n.kind == "call_module" and n.op in _NORM_OPS:
            w = n.params.get("weight")
            if (isinstance(w, torch.Tensor) and w.numel() and _max_abs(w) <= SMALL_SCALE
                    and _feeds_a_combination(graph, n.name)):
                gates.append(Gate(n.name, None, "weight", "zero-norm-gamma", _max_abs(w), n.module))
        elif n.op == "param":
            gate = _param_gate(graph, n)
            if gate is not None:
                gates.append(gate)
    return gates


def _weight_node(graph: Graph, node: Node, weight) -> Node | None:
    """The ``param`` node holding ``weight`` that a functional layer reads, looking
    through layout ops (``self.B.t()``)."""
    from gradaudit.ir import iter_refs

    for ref in iter_refs((node.args, node.kwargs)):
        src = parameter_node(graph, ref, RELAYOUT)
        if src is not None and src.params.get("value") is weight:
            return src
    return None


def _param_gate(graph: Graph, p: Node) -> Gate | None:
    """A parameter used functionally as a closed factor: a small scale multiplying a
    residual branch (``x + gamma * f(x)``, ``gamma.view(...)`` included) or the zero gamma
    of a functional normalization (timm's ``BatchNormAct2d`` calls ``F.batch_norm``)."""
    value = p.params.get("value")
    if not isinstance(value, torch.nn.Parameter) or not value.is_floating_point() or not value.numel():
        return None
    if value.numel() > 1 << 16:  # a weight matrix, not a per-channel factor
        return None
    scale = _max_abs(value)
    if scale > SMALL_SCALE:
        return None
    for user in _acting_on(graph, p.name):
        if user.op in _SCALE_OPS and _feeds_a_combination(graph, user.name):
            return Gate(user.name, p.name, p.module or p.name, "small-scale", scale, p.module)
        is_gamma = (p.module or "").rsplit(".", 1)[-1] == "weight"
        if user.op in _NORM_OPS and is_gamma and _feeds_a_combination(graph, user.name):
            return Gate(user.name, p.name, p.module or p.name, "zero-norm-gamma", scale, p.module)
    return None


def _opened(t: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "zero-weight":
        fan_in = t[0].numel() if t.dim() >= 2 else t.numel()
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) / max(fan_in, 1) ** 0.5
    return torch.ones_like(t)


def opened_graph(graph: Graph, gates: list[Gate]) -> Graph:
    """A copy of ``graph`` whose gates hold unit-gain values (the user's tensors untouched)."""
    from gradaudit.ir import Graph

    gen = torch.Generator().manual_seed(0)
    replace: dict[str, dict] = {}
    for g in gates:
        if g.param_node is not None:
            value = graph[g.param_node].params["value"]
            replace[g.param_node] = {"value": _opened(value.detach(), g.kind, gen)}
        else:
            node = graph[g.node]
            params = dict(replace.get(g.node, node.params))
            params[g.param] = _opened(node.params[g.param].detach(), g.kind, gen)
            replace[g.node] = params
    nodes = [dataclasses.replace(n, params=replace[n.name]) if n.name in replace else n for n in graph.nodes]
    return Graph(nodes=nodes, frontend=graph.frontend, input_names=list(graph.input_names),
                 output_refs=list(graph.output_refs))
