"""Shared helpers for rules: graph structure, init gains and fix lines.

Everything here reads an :class:`~gradaudit.propagation.engine.Analysis` (graph plus
predicted statistics). The module imports no heavy library at import time, so that
listing the rule catalog stays fast; torch is imported inside the functions that need it.

Structure the rules share:

- *residual add*: an ``add``/``sub`` of two tensors where one operand is an ancestor of
  the other and a weight layer lies between them (``x + f(x)``). ``tok_emb + pos_emb``
  or ``x + x.mean()`` are not residual.
- *chain*: weight layers in execution order where each feeds the next (through
  activations, dropout, layout ops, pooling ...). A chain is *plain* when no
  normalization op and no residual add lies between consecutive layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from gradaudit.propagation import depth

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis

#: Ops that pass a value through without changing what "the next activation" is.
TRANSPARENT = frozenset(
    {
        "dropout", "alpha_dropout", "identity", "view", "reshape", "flatten", "unflatten", "permute",
        "transpose", "contiguous", "to", "getitem", "squeeze", "unsqueeze", "clone",
    }
)
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid"})
RELU_FAMILY = frozenset(
    {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "gelu", "silu", "mish", "hardswish"}
)
NORMS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
#: Ops whose weight is a matrix mapping fan_in inputs to each output unit.
DENSE_OPS = frozenset({"linear", "conv"})


# ----------------------------------------------------------------------------- text
def module_expr(qualname: str | None, root: str = "model") -> str:
    """Python expression reaching a submodule: ``layers.3.fc`` -> ``model.layers[3].fc``."""
    if not qualname:
        return root
    parts = qualname.split(".")
    if not all(p.isdigit() or p.isidentifier() for p in parts):
        return f"{root}.get_submodule({qualname!r})"
    return root + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


def graph_node(analysis: Analysis, name: str) -> Node | None:
    """The node of ``analysis.graph`` called ``name``, or None when the graph has none
    (a probe may report a node the captured graph does not hold)."""
    try:
        return analysis.graph[name]
    except KeyError:
        return None


def where(node: Node) -> str:
    """The name a person knows a node by: its module's qualified name (``features.15``,
    as in the per-layer table), else the node's name. Fix lines use :func:`module_expr`."""
    return node.module if node.module else node.name


def listing(items: list[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: the items a finding lists, the first ``limit`` in full."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def name_list(names: list[str], limit: int = 6) -> str:
    """``'a', 'b', 'c' and 4 more``: quoted names, the first ``limit`` in full."""
    return listing([f"'{n}'" for n in names], limit)


def times(decades: float) -> str:
    """``10 ** decades`` formatted (an overflowing value reads as inf)."""
    return fmt(10.0 ** decades) if decades < 300 else "inf"


def fmt(x: float) -> str:
    """A number in 3 significant digits."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


# ----------------------------------------------------------------------------- weights
def weight_matrix(node: Node):
    """The node's weight as a (fan_out, fan_in) matrix view, or None.

    For ``nn.Linear`` that is ``weight``; for a convolution ``weight`` reshaped to
    (C_out, C_in/groups * prod(kernel)), whose row length is the fan-in (He et al. 2015).
    """
    if node.op not in DENSE_OPS:
        return None
    w = node.params.get("weight")
    if w is None or getattr(w, "dim", lambda: 0)() < 2:
        return None
    w = w.detach()
    return w.reshape(w.shape[0], -1)


def fan_in_gain(w) -> float:
    """n E[w^2] over the rows of a (fan_out, fan_in) matrix: the factor a layer applies to
    the second moment of independent zero-mean inputs (He et al. 2015, Eq. 7)."""
    import torch

    return float(torch.linalg.vector_norm(w.float(), dim=1).pow(2).double().mean())


def rows_equal(w) -> bool:
    """True when every row of ``w`` equals the first (constant or zero init)."""
    import torch

    if w.shape[0] < 2 or not torch.equal(w[0], w[1]):
        return False
    return bool((w == w[:1]).all())


def leaky_slope(node: Node | None) -> float:
    """The negative slope of a leaky ReLU node: its module's, or the functional call's
    ``negative_slope`` argument (torch's default 0.01 when neither says)."""
    v = getattr(getattr(node, "fn", None), "negative_slope", None)
    if v is None and node is not None and node.kind != "call_module":
        v = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.01


def needed_gain(act: str | None, act_node: Node | None = None) -> tuple[float, str]:
    """The n Var[w] that keeps the second moment through ``act`` (He et al. 2015).

    ReLU family: 2 (He; 2 / (1 + a^2) for leaky ReLU with slope a). SELU: 1 (LeCun,
    Klambauer et al. 2017). tanh, sigmoid, linear and the rest: 1 (LeCun / Xavier for a
    square layer; tanh with zero bias is critical at sigma_w^2 = 1, Schoenholz et al. 2017).
    """
    if act == "leaky_relu":
        a = leaky_slope(act_node)
        return 2.0 / (1.0 + a * a), "He (leaky ReLU)"
    if act in RELU_FAMILY:
        return 2.0, "He"
    if act == "selu":
        return 1.0, "LeCun"
    return 1.0, "LeCun/Xavier"


# ----------------------------------------------------------------------------- fix lines
def init_fix(analysis: Analysis, node: Node) -> str:
    """The init line that keeps this layer's gain at what the next activation needs."""
    act, act_node = next_activation_node(analysis, node)
    target = f"{module_expr(node.module)}.weight" if node.module else "layer.weight"
    if act == "leaky_relu":
        return f"nn.init.kaiming_normal_({target}, a={leaky_slope(act_node):g}, nonlinearity='leaky_relu')"
    if act in RELU_FAMILY:
        return f"nn.init.kaiming_normal_({target}, nonlinearity='relu')"
    if act == "selu":
        return f"nn.init.kaiming_normal_({target}, nonlinearity='linear')  # LeCun normal for SELU"
    return f"nn.init.kaiming_normal_({target}, nonlinearity='linear')  # LeCun normal: n Var[w] = 1"


def features(node: Node) -> int | None:
    """Feature count a norm after ``node`` would take (channels for conv, last dim else)."""
    shape = node.shape
    if not shape:
        return None
    return shape[1] if node.op == "conv" and len(shape) > 2 else shape[-1]


def norm_ctor(node: Node) -> str:
    n = features(node)
    shape = node.shape or ()
    if node.op == "conv" and len(shape) in (3, 4, 5):
        return f"nn.BatchNorm{len(shape) - 2}d({n})"
    return f"nn.LayerNorm({n})"


def add_norm_fix(node: Node) -> str:
    """One line that puts a normalization layer right after ``node``'s module."""
    if node.module:
        expr = module_expr(node.module)
        return f"{expr} = nn.Sequential({expr}, {norm_ctor(node)})"
    return f"x = {norm_ctor(node)}(x)  # after the layer at {node.location or node.name}"


def swap_activation_fix(analysis: Analysis, node: Node) -> str:
    """One line replacing the saturating activation after ``node`` by a ReLU."""
    act, act_node = next_activation_node(analysis, node)
    if act_node is not None and act_node.kind == "call_module" and act_node.module:
        return (
            f"{module_expr(act_node.module)} = nn.ReLU()  # was {act_node.module_type}; "
            f"then nn.init.kaiming_normal_(..., nonlinearity='relu') on the layers"
        )
    loc = f" at {act_node.location}" if act_node is not None and act_node.location else ""
    return f"x = torch.relu(x)  # instead of {act or 'the activation'}{loc}; He init for the layers"


def culprit_layer(analysis: Analysis, layers) -> tuple[object, str] | None:
    """The weight layer to fix first, with its fix line.

    1. A hidden layer whose n Var[w] is off by more than 2x from what its activation
       needs (:func:`init_mismatch`): the worst one (the earliest among those within 10% of
       the worst), fixed by an init line.
    2. Else, when most layers feed a saturating activation, the activation is the culprit
       (sigmoid' <= 1/4 caps the gain whatever the init or normalization): replace it.
    3. Else the linear/conv layer with the largest predicted change of gradient RMS, by
       an init line; None when there is no linear/conv layer to re-initialise.
    """
    if not layers:
        return None
    scores = []
    for n in layers:
        m = init_mismatch(analysis, n) if has_successor(analysis, n) else None
        scores.append(abs(math.log2(m)) if m is not None and m > 0 else 0.0)
    top = max(scores)
    if top > 1.0:
        worst = next(n for n, s in zip(layers, scores) if s >= 0.9 * top)
        return worst, init_fix(analysis, worst)
    acts = [next_activation(analysis, n) for n in layers]
    sat = [n for n, a in zip(layers, acts) if a in SATURATING]
    if sat and len(sat) >= len(layers) // 2:
        return sat[0], swap_activation_fix(analysis, sat[0])
    inits = layer_inits(analysis)
    grads = [layer_grad(analysis, n) for n in layers]
    worst, score = None, -1.0
    for i in range(len(layers) - 1):
        a, b = grads[i], grads[i + 1]
        if layers[i].name in inits and a > 0 and b > 0:
            s = abs(math.log(a / b))
            if s > score:
                worst, score = layers[i], s
    return (worst, init_fix(analysis, worst)) if worst is not None else None


def culprit_fix(analysis: Analysis, layers) -> str | None:
    """The fix line of :func:`culprit_layer`, or None."""
    culprit = culprit_layer(analysis, layers)
    return culprit[1] if culprit else None


def init_mismatch(analysis: Analysis, node: Node) -> float | None:
    """n E[w^2] of a linear/conv layer divided by the gain its next activation needs
    (:func:`needed_gain`); None for other layers."""
    li = layer_inits(analysis).get(node.name)
    return li.ratio if li is not None else None


# ----------------------------------------------------------------------------- graph walking
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


def followed_by_norm(analysis: Analysis, node: Node) -> bool:
    """Whether a normalization op rescales ``node``'s output before the next weight layer
    (directly, or after its activation / dropout / layout ops)."""
    from gradaudit.propagation.engine import ACTIVATIONS

    return any(u.op in NORMS for u in analysis.next_nodes(node, TRANSPARENT | ACTIVATIONS))


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
    ``link``). Longest path in a DAG by dynamic programming in execution order.
    """
    st = structure(analysis)
    best: dict[str, tuple[int, str | None]] = {}
    by_name = {n.name: n for n in st.weight_layers}
    for n in st.weight_layers:
        if keep is not None and not keep(n):
            continue
        best.setdefault(n.name, (1, None))
        length = best[n.name][0]
        for e in st.edges.get(n.name, []):
            if (e.norm and not allow_norm) or (e.residual and not allow_residual):
                continue
            dst = by_name[e.dst]
            if keep is not None and not keep(dst):
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


def has_successor(analysis: Analysis, node: Node) -> bool:
    """Whether ``node``'s output feeds another weight layer (a hidden layer)."""
    return bool(structure(analysis).edges.get(node.name))


def is_residual_add(analysis: Analysis, node: Node) -> bool:
    return node.name in structure(analysis).residual_adds


def log10_ratio(a: float, b: float) -> float:
    if a <= 0 or b <= 0 or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf if a > b else -math.inf
    return math.log10(a / b)


def slope_per_layer(values: Iterable[float]) -> float | None:
    """Least-squares slope of log10(values) against layer index (decades per layer)."""
    pts = [(i, math.log10(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def parent(qualname: str | None) -> str | None:
    if not qualname or "." not in qualname:
        return None
    return qualname.rsplit(".", 1)[0]



#: The source of a profile predicted with the closed gates opened.
OPENED = "predicted with closed gates opened"


@dataclass
class GradientProfile:
    """The layer gradient G_l (:func:`gradaudit.propagation.depth.layer_gradient`) of each
    weight layer, in execution order, and where the numbers come from."""

    layers: list
    grads: list[float]
    #: "predicted", "measured" (the probe ran) or :data:`OPENED`
    source: str

    @property
    def summary(self) -> depth.DepthSummary:
        return depth.summarize(self.grads)

    @property
    def decades_per_layer(self) -> float:
        """Fitted change per layer moving toward the input (see ``propagation.depth``)."""
        return self.summary.decades_per_layer

    @property
    def end_to_end_decades(self) -> float:
        """log10(G_first / G_last)."""
        return self.summary.end_to_end_decades

    @property
    def group(self) -> int:
        """How many layers each end's median takes: a quarter of them, at least one."""
        return max(1, len(self.grads) // 4)

    @property
    def early(self) -> float:
        """Median G of the first :attr:`group` weight layers (nearest the input)."""
        return _median(self.grads[: self.group])

    @property
    def late(self) -> float:
        """Median G of the last :attr:`group` weight layers (nearest the output)."""
        return _median(self.grads[-self.group:])

    @property
    def change_decades(self) -> float:
        """How far, in decades, the gradient moves from the last weight layer to the
        first: log10(early / late) over the distance between the two quarters' centres
        (n - q layers), scaled to the model's n - 1 (a geometric profile gives exactly
        log10(G_first / G_last)). Vanishing and exploding gradients compound with depth;
        the medians of each quarter, not two single layers, keep one layer's structural
        dip (a projection after a LayerNorm over a large residual stream, a classifier on
        pooled features) from reading as a depth effect."""
        n, q = len(self.grads), self.group
        span = (n - 1) / (n - q) if n > q else 1.0
        return log10_ratio(self.early, self.late) * span

    @property
    def rate_text(self) -> str:
        s = self.decades_per_layer
        if abs(s) < depth.FLAT:
            return "the trend across layers is flat"
        return f"on average gradients {'fall' if s < 0 else 'grow'} 10x every {1 / abs(s):.1f} layers"


def _median(values: list[float]) -> float:
    xs = sorted(values)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


#: The name of a profile's quantity, and its definition, said in every message that quotes it.
GRADIENT_NAME = "weight-gradient scale"
GRADIENT_TERM = f"{GRADIENT_NAME} = sqrt(P) x RMS of dL/d(output), P positions sharing each weight"


def norm_samples(node: Node) -> int | None:
    """How many values a normalization node computes each of its statistics from, with
    the example inputs' shapes: BatchNorm N x spatial per channel, InstanceNorm spatial,
    GroupNorm (C / G) x spatial, LayerNorm the normalized shape. None for other ops."""
    shape = node.shape
    if not shape or node.op not in ("batch_norm", "instance_norm", "group_norm", "layer_norm"):
        return None
    numel = math.prod(shape)
    if node.op == "batch_norm":
        return numel // shape[1] if len(shape) > 1 else shape[0]
    if node.op == "instance_norm":
        return math.prod(shape[2:]) if len(shape) > 2 else 1
    if node.op == "group_norm":
        groups = getattr(node.fn, "num_groups", None)
        if groups is None:
            groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
        return numel // (shape[0] * int(groups)) if isinstance(groups, int) and groups > 0 else None
    normalized = getattr(node.fn, "normalized_shape", None)
    if normalized is None:
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if isinstance(normalized, int):
        normalized = (normalized,)
    if isinstance(normalized, (tuple, list)) and all(isinstance(d, int) for d in normalized):
        return math.prod(normalized)
    return None


#: A normalization over at most this many values passes no gradient at all: with one
#: value its output is constant, with two it is +-1 whatever the input.
DEGENERATE_SAMPLES = 2


def cut_off_by_degenerate_norms(analysis: Analysis) -> set[str]:
    """Nodes whose every path to an output crosses a normalization over at most
    :data:`DEGENERATE_SAMPLES` values: their gradient is zero (one value) or set by the
    normalization's eps (two values), because of the example inputs' size, not the
    model (GA305)."""
    graph = analysis.graph
    free: set[str] = set()
    stack = list(graph.output_refs)
    while stack:
        name = stack.pop()
        if name in free:
            continue
        free.add(name)
        node = graph[name]
        n = norm_samples(node)
        if n is not None and n <= DEGENERATE_SAMPLES:
            continue  # the gradient stops here
        stack.extend(node.inputs)
    return {n.name for n in graph if n.name not in free}


#: Ops between q @ k^T and the softmax that keep it "the logits" (scaling, masking).
LOGIT_PATH = TRANSPARENT | frozenset({"div", "mul", "masked_fill", "add", "sub", "float", "to"})
#: Ops between a projection and the q or k operand of attention (layout, scaling).
_SCORE_PATH = TRANSPARENT | frozenset({"mul", "div"})
_QK_MATMUL = frozenset({"matmul", "einsum", "bmm"})
_FUSED_ATTENTION = frozenset({"scaled_dot_product_attention"})


def _feeds_softmax(analysis: Analysis, node: Node) -> bool:
    """Whether ``node``'s output reaches a softmax through logit ops only (q @ k^T)."""
    users = analysis.next_nodes(node, LOGIT_PATH)
    return bool(users) and all(u.op in ("softmax", "log_softmax") for u in users)


def score_side(analysis: Analysis, node: Node) -> bool:
    """Whether every path from ``node``'s output to the loss goes through attention
    logits, as the query or the key: a q or k projection (through layout and scaling
    ops into ``q @ k^T`` before a softmax, or into the first two operands of
    ``scaled_dot_product_attention``).

    Such a layer's weight gradient is dL/d(logits) times the other operand: with the
    small q/k initialisations transformers use (std 0.02) the logits are near zero, the
    attention near uniform, and the q/k weight gradients are 100-1000x below the value and
    MLP projections' at init, while the gradient along the residual stream is intact
    (Noci et al., "Signal Propagation in Transformers", NeurIPS 2022, on the vanishing
    query/key gradients of uniform attention). It measures the attention's temperature,
    not the gradient's passage through depth, which is what the vanishing/exploding
    rules judge; the temperature has its own rule (GA402).
    """
    stack = [(node.name, u) for u in analysis.users(node.name)]
    if not stack:
        return False
    seen: set[tuple[str, str]] = set()
    while stack:
        src, user = stack.pop()
        if (src, user.name) in seen:
            continue
        seen.add((src, user.name))
        if user.op in _SCORE_PATH:
            nxt = analysis.users(user.name)
            if not nxt:
                return False
            stack.extend((user.name, v) for v in nxt)
        elif user.op in _FUSED_ATTENTION:
            if src not in user.inputs[:2] or src in user.inputs[2:]:
                return False
        elif not (user.op in _QK_MATMUL and _feeds_softmax(analysis, user)):
            return False
    return True


def _finite_layers(analysis: Analysis) -> list | None:
    """The weight layers, or None when one of them lacks finite statistics (an
    incomplete prediction is reported by GA001, never judged)."""
    from gradaudit.propagation.coverage import finite_stats

    layers = analysis.weight_layers()
    if not all(finite_stats(analysis.stat(n.name)) for n in layers):
        return None
    return layers


def gradient_profile(
    analysis: Analysis, *, measured: bool = True, scale_free: bool = False
) -> GradientProfile | None:
    """The profile the vanishing/exploding rules judge.

    - the measured layer gradients when the probe ran (and ``measured``): the real model
      decides;
    - else, when the model has closed zero/small-initialised gates
      (:mod:`gradaudit.propagation.gates`), the prediction with the gates opened: the
      gradient that flows once the first updates open them;
    - else the prediction.

    Layers whose gradient a normalization over one or two values cuts off (GA305: an
    artefact of the example batch) never count, nor do attention's query and key
    projections (:func:`score_side`: their gradient measures the attention's
    temperature, not depth). With ``scale_free`` only the weight
    layers whose output no normalization rescales
    (:func:`followed_by_norm`) count. A layer followed by BatchNorm/LayerNorm is
    scale-invariant: a large gradient grows its weight norm, which shrinks its next
    relative steps (Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch
    Normalization", ICLR 2019; Hoffer et al., NeurIPS 2018), so a large gradient there
    corrects itself, while a small one does not. That is why stock BatchNorm CNNs, whose
    first convolutions get 100-1000x the classifier's weight gradient, train: the
    exploding rule judges the scale-free profile, the vanishing rule every layer.

    None with fewer than two weight layers, an incomplete prediction, or a last layer
    that gets no gradient at all.
    """
    layers = _finite_layers(analysis)
    if layers is not None:
        cut = cut_off_by_degenerate_norms(analysis)
        layers = [
            n for n in layers
            if n.name not in cut and not score_side(analysis, n) and not (scale_free and followed_by_norm(analysis, n))
        ]
    if layers is None or len(layers) < 2:
        return None
    probe = analysis.config.get("probe") if measured else None
    if probe is not None and not analysis.gates:
        rows = [probe.layers.get(n.name) for n in layers]
        if all(r is not None and r.draws and math.isfinite(r.grad_rms) for r in rows):
            grads = [depth.layer_gradient(n, r.grad_rms) for n, r in zip(layers, rows)]
            return _checked(GradientProfile(layers, grads, "measured"))
    source, basis = "predicted", analysis
    if analysis.gates and analysis.opened is not None:
        source, basis = OPENED, analysis.opened
    stats = [basis.stat(n.name) for n in layers]
    if any(s is None for s in stats):
        return None
    grads = [depth.layer_gradient(n, s.grad_rms) for n, s in zip(layers, stats)]
    return _checked(GradientProfile(layers, grads, source))


def layer_grad(analysis: Analysis, node: Node) -> float:
    """The predicted layer gradient G of ``node`` (the one quantity every message about a
    layer's gradient quotes; see :mod:`gradaudit.propagation.depth`)."""
    return depth.layer_gradient(node, analysis.stat(node.name).grad_rms)


def _checked(prof: GradientProfile) -> GradientProfile | None:
    last = prof.grads[-1]
    return prof if last > 0 and math.isfinite(last) else None


@dataclass
class GradientCrossing:
    """Where the gradient profile passes ``limit`` times the last layer's value.

    ``cross`` is set when the change from the last quarter of the weight layers to the
    first (:attr:`GradientProfile.change_decades`) is past the limit: the index of the
    layer nearest the output already past it. ``warn`` is set when, short of that, the
    change reaches :data:`WARN_DECADES`: a fact about this model's profile (a rate
    extrapolated past the model's depth is never reported).
    """

    profile: GradientProfile
    limit: float
    cross: int | None
    warn: bool
    fix: str | None  # :func:`culprit_fix` of the profile's layers, when there is a finding


#: End-to-end change (decades) from which a risk is reported without a crossing.
WARN_DECADES = 2.0


def gradient_crossing(analysis: Analysis, direction: int) -> GradientCrossing | None:
    """Whether the gradient moves past ``10 ** (direction * crossing_decades)`` from the
    output's end of the network to the input's (:attr:`GradientProfile.change_decades`):
    ``direction`` +1 for growth toward the input (exploding, judged on the scale-free
    layers: see :func:`gradient_profile`), -1 for decay (vanishing). ``cross`` is then the
    layer nearest the output past that limit relative to the late median. None when
    there is no profile."""
    prof = gradient_profile(analysis, scale_free=direction > 0)
    if prof is None:
        return None
    decades = analysis.config["settings"].crossing_decades
    limit = 10.0 ** (direction * decades)
    change = direction * prof.change_decades
    cross = None
    if change >= decades:
        late = prof.late
        past = [i for i, g in enumerate(prof.grads) if (g >= late * limit if direction > 0 else g <= late * limit)]
        cross = max(past) if past else 0
    warn = cross is None and change >= min(WARN_DECADES, decades)
    fix = culprit_fix(analysis, prof.layers) if cross is not None or warn else None
    return GradientCrossing(prof, limit, cross, warn, fix)


def factor_text(ratio: float) -> str:
    """A ratio for a message: ``3.4e+05x``, ``0.5x``; never ``inf`` or ``1e+300``."""
    if ratio == 0:
        return "to exactly 0"
    if not math.isfinite(ratio):
        return "from exactly 0"
    return f"{ratio:.3g}x"


@dataclass
class ActivationProfile:
    """Predicted activation RMS at the output of each weight layer, in execution order."""

    layers: list
    acts: list[float]

    def rate_text(self, upto: int | None = None) -> str:
        s = slope_per_layer(self.acts[: (upto + 1) if upto is not None else None])
        if s is None or abs(s) < 1e-3:
            return "the trend across layers is flat"
        return f"at this rate activations {'grow' if s > 0 else 'shrink'} 10x every {1 / abs(s):.1f} layers"


def activation_profile(analysis: Analysis) -> ActivationProfile | None:
    """Predicted activation RMS at each weight layer; with closed gates, as opened (a zero
    head's output is 0 by design, not a collapse)."""
    layers = _finite_layers(analysis)
    if layers is None or len(layers) < 2:
        return None
    basis = analysis.opened if analysis.gates and analysis.opened is not None else analysis
    stats = [basis.stat(n.name) for n in layers]
    if any(s is None for s in stats):
        return None
    return ActivationProfile(layers, [s.act_rms for s in stats])


def activation_crossing(analysis: Analysis, direction: int) -> tuple[ActivationProfile, int, str | None] | None:
    """The first weight layer whose predicted activation RMS is past
    ``10 ** (direction * crossing_decades)`` times the first layer's (``direction`` +1:
    growth, -1: decay), as ``(profile, index, fix)`` with the :func:`culprit_fix` of the
    layers up to it; None when no layer is past it or the first layer's RMS is 0."""
    prof = activation_profile(analysis)
    if prof is None or not prof.acts[0] > 0:
        return None
    first = prof.acts[0]
    limit = 10.0 ** (direction * analysis.config["settings"].crossing_decades)
    if direction > 0:
        hit = next((i for i, a in enumerate(prof.acts) if a >= first * limit), None)
    else:
        hit = next((i for i, a in enumerate(prof.acts) if a <= first * limit), None)
    if hit is None:
        return None
    return prof, hit, culprit_fix(analysis, prof.layers[: hit + 1])


@dataclass
class LayerInit:
    """How a linear/conv layer's weights compare with what its activation needs."""

    node: object
    gain: float  # n E[w^2]
    act: str | None
    needed: float
    scheme: str  # "He", "LeCun", ...
    fan_in: int
    fan_out: int
    normalized: bool  # a norm rescales the output before the next weight layer
    symmetric: bool  # every row equal (constant or zero init)
    hidden: bool  # the output feeds another weight layer

    @property
    def ratio(self) -> float:
        return self.gain / self.needed

    @property
    def xavier_like(self) -> bool:
        """n Var[w] within 25% of LeCun's 1 or of Glorot's 2 n_in / (n_in + n_out)."""
        glorot = 2.0 * self.fan_in / (self.fan_in + self.fan_out)
        return any(0.75 <= self.gain / t <= 1.0 / 0.75 for t in (1.0, glorot))


def layer_inits(analysis: Analysis) -> dict[str, LayerInit]:
    """:func:`layer_init` of every linear/conv weight layer, by node name (computed once
    per analysis; a module called several times is measured once)."""
    st = structure(analysis)
    if st.inits is not None:
        return st.inits
    out: dict[str, LayerInit] = {}
    by_module: dict[str, tuple[float, bool]] = {}
    for n in analysis.weight_layers():
        w = weight_matrix(n)
        if w is None:
            continue
        key = n.module or n.name
        if key not in by_module:
            by_module[key] = (fan_in_gain(w), rows_equal(w))
        gain, sym = by_module[key]
        act, act_node = next_activation_node(analysis, n)
        needed, scheme = needed_gain(act, act_node)
        out[n.name] = LayerInit(
            node=n,
            gain=gain,
            act=act,
            needed=needed,
            scheme=scheme,
            fan_in=w.shape[1],
            fan_out=w.shape[0],
            normalized=followed_by_norm(analysis, n),
            symmetric=sym,
            hidden=has_successor(analysis, n),
        )
    st.inits = out
    return out


# ----------------------------------------------------------------------------- recurrent
#: gamma = max |phi'| (Pascanu et al. 2013): 1 for tanh and ReLU, 1/4 for the sigmoid.
GAMMA = {"tanh": 1.0, "relu": 1.0, "sigmoid": 0.25}
#: The family names of :mod:`gradaudit.propagation.recurrent` as the rules word them.
_FAMILY_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


@dataclass
class RecurrentBlock:
    param: str  # e.g. "weight_hh_l0"
    gate: str  # "input", "cell", ... or "hidden" for a plain RNN
    activation: str
    gamma: float
    sigma_max: float

    @property
    def threshold(self) -> float:
        return 1.0 / self.gamma


def recurrent_kind(node: Node) -> tuple[str, str] | None:
    """``(family, activation)`` of an RNN/LSTM/GRU module or cell: family is ``LSTM``,
    ``GRU`` or ``RNN`` (activation ``tanh`` or ``relu`` for the plain RNN)."""
    from gradaudit.propagation.recurrent import family

    fam = family(node.fn)
    if fam is None:
        return None
    return _FAMILY_NAMES[fam], "relu" if fam == "rnn_relu" else "tanh"


def recurrent_blocks(node: Node) -> list[RecurrentBlock]:
    """Largest singular value of each gate block of every recurrent weight
    (``weight_hh``, ``weight_hh_l{k}``, ``weight_hh_l{k}_reverse``) of the module."""
    from gradaudit.propagation.recurrent import block_sigmas, family

    fam = family(node.fn)
    if fam is None:
        return []
    out = []
    for pname, w in node.params.items():
        if pname.startswith("weight_hh") and w.dim() == 2:
            for gate, act, sigma in block_sigmas(w, fam):
                out.append(RecurrentBlock(pname, gate, act, GAMMA[act], sigma))
    return out


@dataclass
class TimeEvidence:
    """The gradient over time of a recurrent module (or loop) as a rule judges it: the
    measured curve when the probe ran, else the predicted one."""

    record: Any  # gradaudit.propagation.over_time.OverTime
    curve: Any  # gradaudit.propagation.over_time.Curve
    source: str  # "predicted" | "measured"

    @property
    def steps(self) -> int:
        return self.record.steps

    @property
    def within(self) -> bool:
        """Whether the curve crosses 1e-3 (or 1e3) inside the sequence."""
        return self.curve.horizon is not None and not self.curve.extrapolated

    def sentence(self) -> str:
        """``the predicted gradient of a loss on the last step falls below 1e-3 of its
        value after 13.1 of the 80 steps (0.598x per step back)``."""
        c = self.curve
        rate = f"{c.gain:.3g}x per step back" if c.gain is not None else "no steady rate"
        what = f"the {self.source} gradient of a loss on the last step"
        if c.horizon is None:
            return f"{what} stays within 1e-3 to 1e3 of its value over the {self.steps} steps ({rate})"
        verb = "falls below 1e-3" if c.direction == "vanishing" else "rises above 1e3"
        if c.extrapolated:
            return f"{what} {verb} of its value after {c.horizon:.3g} steps at this rate, past the {self.steps} steps ({rate})"
        return f"{what} {verb} of its value after {c.horizon:.3g} of the {self.steps} steps ({rate})"


def recurrent_time(analysis: Analysis, node: Node) -> TimeEvidence | None:
    """The over-time evidence of a recurrent module call, or of the unrolled loop a cell
    call belongs to; None when there is no over-time prediction (an op the handlers do
    not model)."""
    from gradaudit.propagation.over_time import over_time

    for record in over_time(analysis):
        if record.node == node.name or node.name in record.nodes:
            probe = analysis.config.get("probe")
            measured = getattr(probe, "over_time", {}).get(record.node) if probe is not None else None
            if measured is not None:
                return TimeEvidence(record, measured, "measured")
            return TimeEvidence(record, record.predicted, "predicted")
    return None


def recurrent_weights(analysis: Analysis) -> Iterator[tuple[Node, list[RecurrentBlock], str]]:
    """``(node, blocks, severity)`` for each recurrent module call with recurrent weights
    (:func:`recurrent_layers`, :func:`recurrent_blocks`). The severity of a finding on
    it is ``warning`` for a plain RNN and ``info`` for an LSTM or GRU, whose cell state
    carries gradient past the recurrent matrix."""
    cache = analysis.config.setdefault("recurrent_blocks", {})
    for node in recurrent_layers(analysis):
        if node.name not in cache:
            cache[node.name] = recurrent_blocks(node)
        blocks = cache[node.name]
        if blocks:
            yield node, blocks, "warning" if recurrent_kind(node)[0] == "RNN" else "info"


def param_expr(node: Node, param: str) -> str:
    """Python expression reaching a parameter of ``node``'s module (the bare name when the
    node has no module)."""
    return f"{module_expr(node.module)}.{param}" if node.module else param


def recurrent_layers(analysis: Analysis) -> list:
    """Recurrent module calls, one per module (a cell called in a loop counts once)."""
    seen: set[str] = set()
    out = []
    for n in analysis.graph:
        if n.kind != "call_module" or recurrent_kind(n) is None:
            continue
        key = n.module or n.name
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out
