"""Graph structure the rules share, computed once per analysis: the activation and the
normalization after a layer, residual adds, and chains of weight layers.

- *residual add*: an ``add``/``sub`` of two tensors where one operand is an ancestor of
  the other and a weight layer lies between them (``x + f(x)``). ``tok_emb + pos_emb``
  or ``x + x.mean()`` are not residual.
- *chain*: weight layers in execution order where each feeds the next (through
  activations, dropout, layout ops, pooling ...). A chain is *plain* when no
  normalization op and no residual add lies between consecutive layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradaudit.rules.evidence.ops import DENSE_OPS, NORMS, RELU_FAMILY, TRANSPARENT

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis


def graph_node(analysis: Analysis, name: str) -> Node | None:
    """The node of ``analysis.graph`` called ``name``, or None when the graph has none
    (a probe may report a node the captured graph does not hold)."""
    try:
        return analysis.graph[name]
    except KeyError:
        return None


def next_activation_node(analysis: Analysis, node: Node) -> tuple[str | None, Node | None]:
    """The activation applied to ``node``'s output (looking through layout ops, dropout and
    normalization), with its node; ``(None, None)`` when a linear map follows."""
    from gradaudit.propagation.engine import ACTIVATIONS

    for user in analysis.next_nodes(node, TRANSPARENT | NORMS):
        if user.op in ACTIVATIONS:
            return user.op, user
    return None, None


def next_activation(analysis: Analysis, node: Node) -> str | None:
    """The activation op applied to ``node``'s output, looking through norms/dropout."""
    return next_activation_node(analysis, node)[0]


#: Sums a normalization may rescale as a whole (:func:`followed_by_norm`).
SUMS = frozenset({"add", "sub"})


def followed_by_norm(analysis: Analysis, node: Node) -> bool:
    """Whether a normalization op rescales ``node``'s output before the next weight layer:
    directly, or after its activation / dropout / layout ops, or as a term of a sum
    that goes, alone or through further sums of one reader each, only into
    normalizations (BERT's word + position + token-type embeddings into LayerNorm, a
    Post-LN block's ``norm(x + f(x))``: the terms are rescaled together). A sum that is
    also carried on as it is (a Pre-LN residual stream, read by the next block's norm
    and passed to the next block's sum) does not count."""
    from gradaudit.propagation.engine import ACTIVATIONS

    skip = TRANSPARENT | ACTIVATIONS
    after = analysis.next_nodes(node, skip)
    if any(u.op in NORMS for u in after):
        return True
    return len(after) == 1 and _sum_into_norm(analysis, after[0], skip, 8)


def _sum_into_norm(analysis: Analysis, node: Node, skip: frozenset[str], budget: int) -> bool:
    """Whether ``node`` is a sum read only by normalizations, or by one further such sum."""
    if node.op not in SUMS or budget <= 0:
        return False
    after = analysis.next_nodes(node, skip)
    if after and all(u.op in NORMS for u in after):
        return True
    return len(after) == 1 and _sum_into_norm(analysis, after[0], skip, budget - 1)


@dataclass
class Edge:
    src: str
    dst: str
    norm: bool  # every path between them crosses a normalization op
    residual: bool  # every path between them crosses a residual add


@dataclass
class Structure:
    """Facts about the graph computed once per analysis."""

    weight_layers: list
    index: dict[str, int]
    residual_adds: set[str]
    edges: dict[str, list[Edge]] = field(default_factory=dict)
    wdepth: dict[str, int] = field(default_factory=dict)
    inits: dict | None = None  # layer_inits(), filled on first use


_CACHE: dict[int, tuple[object, Structure]] = {}


def structure(analysis: Analysis) -> Structure:
    """Residual adds and layer-to-layer edges of ``analysis.graph`` (cached)."""
    key = id(analysis)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is analysis:
        return hit[1]
    st = _build_structure(analysis)
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[key] = (analysis, st)
    return st


def _build_structure(analysis: Analysis) -> Structure:
    graph = analysis.graph
    # layers without predicted statistics (an op that could not be estimated) are looked
    # through like any other op, so every chain layer has statistics
    wl = [n for n in analysis.weight_layers() if analysis.stat(n.name) is not None]
    wset = {n.name for n in wl}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    anc: dict[str, int] = {}
    wdepth: dict[str, int] = {}
    for n in graph.nodes:
        a = 0
        d = 0
        for src in n.inputs:
            a |= anc[src] | (1 << order[src])
            d = max(d, wdepth[src])
        anc[n.name] = a
        wdepth[n.name] = d + (1 if n.name in wset else 0)
    residual: set[str] = set()
    for n in graph.nodes:
        if n.op not in ("add", "sub") or len(n.inputs) < 2:
            continue
        a, b = n.inputs[0], n.inputs[1]
        related = (anc[b] >> order[a]) & 1 or (anc[a] >> order[b]) & 1
        if related and wdepth[a] != wdepth[b]:
            residual.add(n.name)
    st = Structure(wl, {n.name: i for i, n in enumerate(wl)}, residual, wdepth=wdepth)
    for layer in wl:
        st.edges[layer.name] = _edges_from(analysis, layer, wset, residual)
    return st


def _edges_from(analysis: Analysis, layer: Node, wset: set[str], residual: set[str]) -> list[Edge]:
    """Weight layers reached from ``layer`` without passing another weight layer.

    Walks users with a state (crossed a norm, crossed a residual add), so each node is
    visited at most four times; an edge is ``norm`` / ``residual`` only if every path has
    that crossing. A walk that has crossed one residual add stops at the next one: past
    it lies the rest of the residual stream, whose layers the next blocks reach, so a
    stack of n blocks costs O(n) walks of one block each, not O(n^2).
    """
    graph = analysis.graph
    seen: set[tuple[str, bool, bool]] = set()
    found: dict[str, tuple[bool, bool]] = {}
    stack = [(u, False, False) for u in graph.users(layer.name)]
    while stack:
        node, nrm, res = stack.pop()
        key = (node.name, nrm, res)
        if key in seen:
            continue
        seen.add(key)
        if node.name in wset:
            old = found.get(node.name)
            found[node.name] = (nrm, res) if old is None else (old[0] and nrm, old[1] and res)
            continue
        if node.op == "output":
            continue
        if res and node.name in residual:
            continue
        nrm2 = nrm or node.op in NORMS
        res2 = res or node.name in residual
        for u in graph.users(node.name):
            stack.append((u, nrm2, res2))
    return [Edge(layer.name, dst, n, r) for dst, (n, r) in found.items()]


def longest_chain(
    analysis: Analysis,
    *,
    allow_norm: bool,
    allow_residual: bool,
    keep: Callable[[Node], bool] | None = None,
    link: Callable[[Node, Node], bool] | None = None,
) -> list:
    """The longest sequence of weight layers, each feeding the next, whose edges cross
    no normalization (unless ``allow_norm``) and no residual add (unless
    ``allow_residual``), and whose layers all satisfy ``keep`` (and consecutive pairs
    ``link``). Longest path in a DAG by dynamic programming in execution order. Frozen
    layers take no part (:func:`trained`): a frozen backbone's structure is not the
    training's concern.
    """
    st = structure(analysis)
    best: dict[str, tuple[int, str | None]] = {}
    by_name = {n.name: n for n in st.weight_layers}
    live = {n.name for n in trained(st.weight_layers)}
    for n in st.weight_layers:
        if n.name not in live or (keep is not None and not keep(n)):
            continue
        best.setdefault(n.name, (1, None))
        length = best[n.name][0]
        for e in st.edges.get(n.name, []):
            if (e.norm and not allow_norm) or (e.residual and not allow_residual):
                continue
            dst = by_name[e.dst]
            if e.dst not in live or (keep is not None and not keep(dst)):
                continue
            if link is not None and not link(n, dst):
                continue
            if best.get(e.dst, (0, None))[0] < length + 1:
                best[e.dst] = (length + 1, n.name)
    if not best:
        return []
    end = max(best, key=lambda k: (best[k][0], -st.index[k]))
    chain = []
    cur: str | None = end
    while cur is not None:
        chain.append(by_name[cur])
        cur = best[cur][1]
    return chain[::-1]


#: The gating activations of squeeze-and-excitation blocks.
GATES = frozenset({"sigmoid", "hardsigmoid"})
#: What a gate's own branch may hold between a weight layer and its gate.
_GATE_PATH = TRANSPARENT | RELU_FAMILY | DENSE_OPS | NORMS


def gate_side(analysis: Analysis, node: Node) -> bool:
    """Whether every path from ``node``'s output to the loss ends in a gate: a sigmoid
    whose output multiplies a larger tensor it is broadcast over (the excitation of a
    squeeze-and-excitation block, Hu et al., CVPR 2018: pool, fc1, act, fc2, sigmoid,
    then x * gate), through weight layers and activations of the gate's own branch.

    Each gate value scales every position of its channel, so its gradient is the sum
    over those H x W positions of g x, g the gradient of the map it scales: the branch, a
    side path two layers long, inherits that map's gradient scale instead of carrying
    one through depth. Behind BatchNorm that scale grows toward the input, harmlessly
    (the normalized layers are scale-invariant, and the exploding rule does not judge
    them: :func:`followed_by_norm`), and the gates with it: EfficientNet-B0's first SE
    convolutions get 5-10x the classifier's output gradient at init, and every stock
    EfficientNet and RegNetY read as exploding on them."""
    stack = [(node, u) for u in analysis.users(node.name)]
    if not stack:
        return False
    seen: set[tuple[str, str]] = set()
    while stack:
        src, user = stack.pop()
        if (src.name, user.name) in seen:
            continue
        seen.add((src.name, user.name))
        if user.op in GATES:
            muls = analysis.users(user.name)
            if not muls or not all(_broadcast_factor(analysis, m, user) for m in muls):
                return False
        elif user.op in _GATE_PATH:
            nxt = analysis.users(user.name)
            if not nxt:
                return False
            stack.extend((user, v) for v in nxt)
        else:
            return False
    return True


def _broadcast_factor(analysis: Analysis, mul: Node, gate: Node) -> bool:
    """``mul`` multiplies ``gate``'s output into a larger tensor (broadcast over it)."""
    if mul.op != "mul" or len(mul.inputs) != 2 or gate.meta is None or mul.meta is None:
        return False
    other = next((i for i in mul.inputs if i != gate.name), None)
    other_node = graph_node(analysis, other) if other is not None else None
    return other_node is not None and mul.meta.numel > gate.meta.numel and other_node.meta is not None \
        and other_node.meta.numel == mul.meta.numel


def reaching_outputs(analysis: Analysis, stop: Callable[[Node], bool] | None = None) -> set[str]:
    """The nodes some chain of inputs leads from to an output, the chains not passing
    through a node ``stop`` holds (which is reached itself, but not its inputs)."""
    graph = analysis.graph
    seen: set[str] = set()
    stack = list(graph.output_refs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = graph[name]
        if stop is None or not stop(node):
            stack.extend(node.inputs)
    return seen


def without_path_to_output(analysis: Analysis) -> set[str]:
    """The nodes no chain of inputs leads from to an output: nothing they compute reaches
    the loss (an unused layer, an output that is detached or rebuilt from numpy)."""
    reached = reaching_outputs(analysis)
    return {n.name for n in analysis.graph if n.name not in reached}


def has_successor(analysis: Analysis, node: Node) -> bool:
    """Whether ``node``'s output feeds another weight layer (a hidden layer)."""
    return bool(structure(analysis).edges.get(node.name))


def is_residual_add(analysis: Analysis, node: Node) -> bool:
    return node.name in structure(analysis).residual_adds


def frozen(node) -> bool:
    """Whether the ``nn.Parameter`` s a layer reads (those a computed weight comes from
    included) all have ``requires_grad=False``: a frozen backbone, a LoRA base weight.
    A layer without any (an ONNX model's initializers) is never frozen: plain tensors
    say nothing about training."""
    import torch

    params = [p for p in node.params.values() if isinstance(p, torch.nn.Parameter)]
    return bool(params) and not any(p.requires_grad for p in params)


def trained(layers: list) -> list:
    """The layers that train: the frozen ones (:func:`frozen`) pass gradients on but
    need none of their own, so the depth of a gradient is judged over the others. All of
    them when every layer is frozen (the model as it would train once unfrozen)."""
    kept = [n for n in layers if not frozen(n)]
    return kept if kept else layers
