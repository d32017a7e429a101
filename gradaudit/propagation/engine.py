"""The walk: forward moments in execution order, gradient moments in reverse.

Like torch.fx's ``ShapeProp``, the engine is one pass over the graph that writes a
result per node; errors name the node (and the user's line) they happened at.

Forward, every node gets :class:`~gradaudit.ir.Stats` (mean and second moment of each
output). Elementwise ops that depend on a single source value — ``relu(x)``,
``x * sigmoid(x)``, ``0.5 * x * (1 + tanh(...))`` — are *fused* onto that source
("root") and evaluated exactly by quadrature on the composed function, which keeps the
correlation between ``x`` and ``sigmoid(x)`` that an op-by-op treatment would lose.
Other ops go through the handler table; ops without a handler are estimated by local
Monte Carlo and listed.

Backward, the second moment of dL/d(value) starts at 1 on every floating output (L =
sum of <y, g>, g ~ N(0, 1)) and flows through each handler's gains, summed over the
users of a value (independent contributions add in second moment). With it flow the
gradient's coherent covariances (:class:`~gradaudit.propagation.channels.Grad`): zero
at the outputs, created where a value is shared by many positions (pooling, broadcast).

Coherence through a fused group: for two positions x_i, x_j of one sample with
correlation rho = cov / var (the root's coherent share), Cov(f(x_i), f(x_j)) follows from
f's Hermite coefficients by Mehler's formula
(:func:`~gradaudit.propagation.moments.coherent_moment`); the same holds for a
derivative f', which carries a coherent gradient: E[f'(x_i) f'(x_j)] E[g_i g_j].

Two places go beyond independent values. Along a residual stream relu(x + branch), a
position where the stream is positive stays positive in the blocks after it, so the
gradient that reaches a ReLU there went through open ReLUs more often than an average
one: the gradient carries its profile over the stream's value
(:mod:`~gradaudit.propagation.persistence`). Layers that are deep copies of one layer
(``nn.TransformerEncoder`` clones the layer it is given) repeat one Jacobian, whose
leading directions compound: such a stack's backward is evaluated on sampled inputs
(:mod:`~gradaudit.propagation.tied`).

Limits (measured by ``benchmarks/accuracy.py``): each layer's weights are otherwise
taken as an independent draw, and the gradient a residual branch sends back is taken as
uncorrelated with the one the identity path carries. For one draw of weights the
branch's Jacobian has a trace of either sign that correlates the two (+1.2% of their
power per block on average, up to +6%, in 32 blocks of relu(x + conv(relu(conv(x))))
without normalization): the gradient at that network's stem comes out 0.32 decades
low, p90 0.24 over its layers.
Positions are described by one profile per position axis (``Stats.prof``: a class
token's small stream beside the patch tokens, the gradient that a head on token 0
puts there); what reaches two positions from one source (one gradient read at two
tokens) is taken as independent there, so their coherent part is not tracked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.ir import callable_of, Graph, Node, Ref, Stats, in_place, iter_refs, map_refs, mean_value
from gradaudit.propagation import montecarlo, over_time, persistence, rows, tied
from gradaudit.frontends import functions
from gradaudit.frontends.patterns import PRODUCTS
from gradaudit.propagation.ops import chunked, select
from gradaudit.propagation.ops.base import HANDLERS, Ctx, Effect, Unhandled, make_stats
from gradaudit.propagation.channels import AtMax, Grad, Split, Take, apply_gain, normalize_axis, sets_profile
from gradaudit.serial import serial
from gradaudit.propagation.moments import (
    channel_points,
    coherent_moment,
    gamma_points,
    gaussian_points,
    hermite_coefficients,
    max_of_k_weights,
    skewed_points,
)

#: Activation ops (the rules treat these as a network's nonlinearity).
ACTIVATIONS = frozenset(
    {
        "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
        "sigmoid", "tanh", "hardtanh", "hardsigmoid", "hardswish", "softplus", "softsign",
        "logsigmoid", "tanhshrink", "softshrink", "hardshrink", "threshold", "swish",
    }
)
#: Elementwise, deterministic ops that may be fused onto a single source.
ELEMENTWISE = ACTIVATIONS | frozenset(
    {
        "exp", "expm1", "exp2", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "abs", "neg",
        "sin", "cos", "tan", "sinh", "cosh", "atan", "asinh", "erf", "erfc", "square", "pow",
        "clamp", "clamp_min", "clamp_max", "reciprocal", "add", "sub", "rsub", "mul", "div",
        "maximum", "minimum", "nan_to_num", "sign", "positive", "float_power", "addcmul",
    }
)
#: Ops whose module owns weights that set a layer's depth.
WEIGHT_OPS = frozenset(
    {"linear", "conv", "conv_transpose", "bilinear", "embedding", "multihead_attention", "rnn", "lstm", "gru",
     "rnn_cell", "lstm_cell", "gru_cell", "grouped_mm"}
)
NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})


@dataclass
class _AtMaxPart:
    """A gradient contribution that reached only the arg-max of ``window`` values."""

    value: Any
    window: int
    #: already part of a plain contribution (a concatenation hands its pieces their
    #: slice of the whole gradient, and names the arg-max share of that slice apart)
    counted: bool = False


class PropagationError(Exception):
    """A handler failed in a way that is a bug, not an unknown op."""


@dataclass
class Estimate:
    node: str
    op: str
    module: str | None
    reason: str
    ok: bool
    #: The custom ``autograd.Function`` an ``autograd_function`` node applies.
    function: str | None = None

    def to_json(self) -> dict:
        out = {"node": self.node, "op": self.op, "module": self.module, "reason": self.reason, "ok": self.ok}
        if self.function is not None:
            out["function"] = self.function
        return out


@dataclass
class Analysis:
    """Graph plus everything propagation learned about it; what rules read."""

    graph: Graph
    stats: dict[str, list[Stats | None]]
    roots: dict[str, str]
    effects: dict[str, Effect]
    estimates: list[Estimate]
    config: dict[str, Any] = field(default_factory=dict)
    #: :class:`~gradaudit.propagation.coverage.Coverage`, set by the audit after the walk.
    coverage: Any = None
    #: Closed zero/small-initialised gates (:mod:`gradaudit.propagation.gates`) and the
    #: analysis of the same graph with them opened (None when there are none).
    gates: list = field(default_factory=list)
    #: Stacks of identically initialised layers whose backward was evaluated
    #: numerically (:mod:`gradaudit.propagation.tied`).
    tied: list = field(default_factory=list)
    opened: "Analysis | None" = None

    def stat(self, name: str, leaf: int = 0) -> Stats | None:
        s = self.stats.get(name)
        return s[leaf] if s and leaf < len(s) else None

    def layers(self) -> list[Node]:
        """Calls of modules that own parameters, and functional ops that multiply by a
        parameter (:func:`gradaudit.frontends.patterns.functional_layers`), in execution
        order."""
        return [n for n in self.graph if n.params and n.kind in ("call_module", "call_function", "call_method")]

    def weight_layers(self) -> list[Node]:
        """The layers that count for depth: linear, conv, attention, recurrent, ... (an
        unrolled loop of cell calls counts once, as its last call: its other calls are
        time steps, analysed over time)."""
        steps = over_time.time_steps(self)
        return [
            n
            for n in self.layers()
            if (n.op in WEIGHT_OPS or n.op in PRODUCTS
                or (n.op in ("module", functions.OP) and any(p.dim() >= 2 for p in n.params.values())))
            and n.name not in steps
        ]

    def users(self, name: str) -> list[Node]:
        return self.graph.users(name)

    def next_nodes(self, node: Node, skip: frozenset[str] = frozenset()) -> list[Node]:
        """Users of ``node``, looking through ops in ``skip`` (layout ops, dropout...)."""
        out: list[Node] = []
        for u in self.users(node.name):
            if u.op in skip:
                out.extend(self.next_nodes(u, skip))
            else:
                out.append(u)
        return out

    def prev_nodes(self, node: Node, skip: frozenset[str] = frozenset()) -> list[Node]:
        out: list[Node] = []
        for name in node.inputs:
            src = self.graph[name]
            if src.op in skip:
                out.extend(self.prev_nodes(src, skip))
            else:
                out.append(src)
        return out

    def effect_info(self, name: str) -> dict:
        e = self.effects.get(name)
        return e.info if e is not None else {}


class Engine:
    def __init__(self, graph: Graph, input_stats: dict[str, Stats | tuple[float, float]] | None = None) -> None:
        self.graph = graph
        self.input_stats = input_stats or {}
        self.stats: dict[str, list[Stats | None]] = {}
        self.roots: dict[str, str] = {}  # fused node -> root
        self.groups: dict[str, list[str]] = {}  # root -> fused members in order
        self.effects: dict[str, Effect] = {}
        self.estimates: list[Estimate] = []
        # root -> (E[phi'^2], E[phi'_i phi'_j] same sample, E[phi']^2) of its lone member
        self.single_d2: dict[str, tuple] = {}
        self._rho_cache: dict[tuple[str, bool], torch.Tensor | None] = {}
        self._weak_cache: dict[tuple[str, bool], bool] = {}
        self._asym_cache: dict[str, bool] = {}  # root -> _asymmetric(its statistics)
        # root -> (channel -> distinct law index or None, the laws' means, variances)
        self._inv: dict[str, tuple] = {}
        self._moment_cache: dict[tuple, tuple[float, float] | None] = {}
        # (value, leaf) -> [(sum node, gradient part)] received through residual sums
        self._sum_parts: dict[tuple[str, int], list[tuple[str, Grad]]] = {}
        # residual sum feeding a ReLU -> (its quadrature nodes, its gradient's value profile)
        self._value_profile: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # ReLU root -> its coarse nodes and weights, formed in the forward for the backward's
        # value profiles (:meth:`_persistence`) instead of solving for the nodes again
        self._coarse: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reuse: dict[tuple, chunked.Reuse] = {}

    # -- lookups used by handlers ----------------------------------------------------
    def leaf_stats(self, name: str, leaf: int = 0) -> Stats | None:
        s = self.stats.get(name)
        return s[leaf] if s is not None and leaf < len(s) else None

    # -- forward -------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.graph:
            try:
                self._forward(node)
            except (PropagationError, Unhandled):
                raise
            except Exception as exc:  # a bug in a handler: name the node
                raise PropagationError(f"propagation failed at {node.describe()}: {exc}") from exc
        self._backward()
        stacks = tied.apply(self.graph, self.stats)
        return Analysis(self.graph, self.stats, self.roots, self.effects, self.estimates, tied=stacks)

    def _forward(self, node: Node) -> None:
        if node.op == "input":  # one Stats per floating leaf (an LSTM's (h0, c0) has two)
            given = self.input_stats.get(node.name, (0.0, 1.0))
            floating = [m is not None and m.is_float for m in node.outputs or [None]]
            if isinstance(given, Stats) and floating == [True]:  # the example tensor's own statistics
                self.stats[node.name] = [_copy(given)]
                return
            mean, std = given if not isinstance(given, Stats) else (0.0, 1.0)
            self.stats[node.name] = [Stats(mean=mean, m2=std * std + mean * mean) if f else None for f in floating]
            return
        if node.op == "param":
            # a constant with inf / nan entries (a causal mask of -inf, T5's log of a zero
            # relative position before its bucket masks it) has no moments: it gets none,
            # and the ops that read it see its values (an attention's mask) or stop there
            # an additive attention mask's fills (float32's smallest number) are no values:
            # its moments are its other entries' (second moments past 1e60 hold fills)
            v = node.params.get("value")
            found = self._moments(v) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() else None
            if found is not None and found[1] >= select.MASK_FILL**2:
                found = select.kept_moments(v)
            self.stats[node.name] = [None if found is None else Stats(mean=found[0], m2=found[1])]
            return
        if node.op == "output":
            return
        if not any(m is not None and m.is_float for m in node.outputs):
            self.stats[node.name] = [None] * max(len(node.outputs), 1)
            return
        root = self._fusable_root(node)
        if root is not None:
            try:
                self._forward_fused(node, root)
                return
            except (RuntimeError, TypeError, ValueError):
                self.roots.pop(node.name, None)
                members = self.groups.get(root)
                if members and members[-1] == node.name:
                    members.pop()
                if not members:
                    self.groups.pop(root, None)
                    self.single_d2.pop(root, None)
        if self._input_missing(node):
            # an upstream op left no statistics: nothing to model or sample here (the
            # coverage check reports the op where statistics stopped, not every op after it)
            self.stats[node.name] = [None] * max(len(node.outputs), 1)
            return
        effect = self._apply_handler(node)
        self.effects[node.name] = effect
        self.stats[node.name] = list(effect.out) + [None] * (len(node.outputs) - len(effect.out))

    def _moments(self, value: torch.Tensor) -> tuple[float, float] | None:
        """:func:`chunked.moments` of a constant, once per distinct tensor: the decoder
        layers of a meta model's stand-in all read the same weights (and a permuted view
        of a tensor is the same entries: :func:`chunked.in_memory_order`)."""
        key = _tensor_key(chunked.in_memory_order(value))
        if key is None:  # a tensor without plain storage
            return chunked.moments(value)
        if key not in self._moment_cache:
            self._moment_cache[key] = chunked.moments(value)
        return self._moment_cache[key]

    def reuse(self, weight: torch.Tensor) -> "chunked.Reuse | None":
        """The run's :class:`chunked.Reuse` of a big weight, one per distinct tensor (the
        decoder layers of a meta model's stand-in share theirs); None for a tensor without
        plain storage."""
        key = _tensor_key(weight)
        if key is None:
            return None
        if key not in self._reuse:
            self._reuse[key] = chunked.Reuse(weight)
        return self._reuse[key]

    def _input_missing(self, node: Node) -> bool:
        """Whether a floating tensor input of ``node`` has no statistics."""
        for ref in iter_refs((node.args, node.kwargs)):
            src = self.graph[ref.name]
            if src.op == "param":
                continue
            floating = any(m is not None and m.is_float for m in src.outputs)
            if floating and all(s is None for s in self.stats.get(ref.name, [None])):
                return True
        return False

    def _apply_handler(self, node: Node) -> Effect:
        handler = HANDLERS.get(node.op)
        reason = "no handler for this op"
        custom = functions.function_name(node.fn) if node.op == functions.OP else None
        if custom is not None:  # its backward is the user's: only real autograd runs it
            reason = f"custom autograd.Function {custom}, run with its own backward"
        elif node.op == functions.HOOK_OP:
            reason = "a gradient hook of the forward (Tensor.register_hook), run on a sampled gradient"
        if handler is not None:
            try:
                return handler(Ctx(node, self))
            except Unhandled as exc:
                reason = f"handler cannot model it: {exc}"
        try:
            effect = montecarlo.estimate(node, self)
            self.estimates.append(Estimate(node.name, node.op, node.module, reason, ok=True, function=custom))
            return effect
        except Exception as exc:  # the op cannot even run on sampled inputs
            self.estimates.append(
                Estimate(node.name, node.op, node.module, f"{reason}; could not be run alone: {exc}", ok=False,
                         function=custom)
            )
            return Effect([None] * max(len(node.outputs), 1), [])

    # -- fusion of elementwise ops ---------------------------------------------------
    def _fusable_root(self, node: Node) -> str | None:
        if node.op not in ELEMENTWISE or node.fn is None or node.tuple_output:
            return None
        if node.kind == "call_module" and node.params and node.op != "prelu":
            return None
        roots = set()
        for ref in iter_refs((node.args, node.kwargs)):
            src = self.graph[ref.name]
            if src.op == "param" or src.tuple_output:
                return None
            roots.add(self.roots.get(ref.name, ref.name))
        for v in list(node.args) + list(node.kwargs.values()):
            if isinstance(v, torch.Tensor):
                return None
        if len(roots) != 1:
            return None
        root = roots.pop()
        rmeta = self.graph[root].meta
        if rmeta is None or not rmeta.is_float or rmeta.shape != node.shape or self.leaf_stats(root) is None:
            return None
        return root

    def _eval_group(self, root: str, z: torch.Tensor, upto: str, leaf: str | None = None) -> tuple[dict, torch.Tensor | None]:
        """Evaluate the fused chain from ``root`` (fed ``z``) up to member ``upto``.

        With ``leaf`` set, that value is detached and made a leaf requiring grad, so
        derivatives with respect to it can be taken. Returns all values and the leaf.
        """
        vals: dict[str, torch.Tensor] = {root: z}
        leaf_t = None
        if leaf == root:
            leaf_t = z
        for name in self.groups[root]:
            n = self.graph[name]
            # an in-place op (ReLU(inplace=True), relu_) gets copies: it must not
            # overwrite a value that other members or the gradient still read
            copy = (lambda r: vals[r.name].clone()) if in_place(n) else (lambda r: vals[r.name])
            v = callable_of(n)(*map_refs(n.args, copy), **map_refs(n.kwargs, copy))
            if not isinstance(v, torch.Tensor) or v.shape != z.shape:
                raise TypeError(f"{name} is not elementwise")
            if name == leaf:
                v = v.detach().requires_grad_(True)
                leaf_t = v
            vals[name] = v
            if name == upto:
                break
        return vals, leaf_t

    def _points(self, root: str, window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Quadrature nodes for the root's distribution: (nodes,) or (nodes, U), one
        column per distinct channel distribution (:meth:`_distinct`; :meth:`_cols`
        spreads a column result back to the C channels).

        With ``window`` k > 1 the weights are those of the maximum of k independent
        draws, k phi(z) Phi(z)^(k-1) (max pooling's arg-max)."""
        rs = self.leaf_stats(root)
        if rs.has_channels:
            mean, var = self._distinct(root)
        if _skewed(rs):
            x, w = gamma_points(mean, var, True) if rs.has_channels else gamma_points(rs.mean, rs.var, False)
        elif self._asymmetric_root(root):
            # an asymmetric root's channels share no columns (:meth:`_distinct`)
            k3 = rs.third(rs.axis, mean.numel()) if rs.has_channels else rs.k3
            x, w = skewed_points(mean, var, k3, True) if rs.has_channels else skewed_points(rs.mean, rs.var, k3, False)
        elif rs.has_channels:
            x, w = channel_points(mean, var)
        else:
            x, w = gaussian_points(rs.mean, rs.var)
        if window > 1:
            w = max_of_k_weights(window, rs.has_channels)
        return x, w

    def _distinct(self, root: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of the root's distinct channel distributions. Channels whose mean
        and standard deviation agree to DISTINCT_TOL of the layer's RMS share one set of
        quadrature nodes (after a BatchNorm at its default affine every channel has the
        same law, up to rounding): the chain is evaluated once per distinct law instead
        of once per channel (:data:`DISTINCT_TOL_WIDE` in wide layers). Not when a member
        has per-channel parameters (PReLU)."""
        if root not in self._inv:
            rs = self.leaf_stats(root)
            mean, var = rs.channels(rs.axis, rs.ch_mean.numel())
            inv = None
            if DISTINCT_TOL > 0 and not any(self.graph[m].params for m in self.groups.get(root, [])) and not self._asymmetric_root(root):
                std = var.clamp_min(0.0).sqrt()
                tol = DISTINCT_TOL_WIDE if mean.numel() > WIDE_CHANNELS else DISTINCT_TOL
                unit = tol * max(float((mean * mean + var).mean().sqrt()), 1e-300)
                k1, k2 = torch.round(mean / unit), torch.round(std / unit)
                k1, k2 = k1 - k1.min(), k2 - k2.min()
                span = float(k2.max()) + 1
                if float(k1.max()) * span < 2.0**52:  # one exact float key per (mean, std) cell
                    uniq, inv = torch.unique(k1 * span + k2, return_inverse=True)
                    if uniq.numel() > mean.numel() // 2:
                        inv = None  # little to share
            if inv is None:
                self._inv[root] = (None, mean, var)
            else:
                n = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inv, torch.ones_like(mean))
                mean_u = torch.zeros_like(n).index_add_(0, inv, mean) / n
                var_u = torch.zeros_like(n).index_add_(0, inv, var) / n
                self._inv[root] = (inv, mean_u, var_u)
        _, mean, var = self._inv[root]
        return mean, var

    def _cols(self, root: str, t):
        """A per-column result (last dim U) of :meth:`_points` spread to the C channels."""
        entry = self._inv.get(root)
        if entry is None or entry[0] is None or not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        return t.index_select(t.dim() - 1, entry[0])  # t[..., entry[0]], gathered faster

    def channel_pieces(self, name: str) -> list[str] | None:
        """The pieces of ``name`` when it is a concatenation along its channel axis of
        values that all track channels (an Inception block's branches), else None."""
        node = self.graph[name]
        if node.op not in ("cat", "concat") or node.outputs[0] is None:
            return None
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not all(isinstance(t, Ref) for t in tensors):
            return None
        s = self.leaf_stats(name)
        if s is None or not s.has_channels or normalize_axis(dim, len(node.outputs[0].shape)) != s.axis:
            return None
        pieces = [t.name for t in tensors]
        if not all((p := self.leaf_stats(n)) is not None and p.has_channels and p.axis == s.axis for n in pieces):
            return None
        return pieces

    def fused_max_moments(self, name: str, window: int):
        """E[max] and E[max^2] over windows of ``window`` values of fused node ``name``,
        when it is a nondecreasing function of its root (so max f(z) = f(max z)): per
        channel vectors or 0-d tensors. None when not applicable.

        A concatenation along channels of such values (an Inception block's output
        before its pooling) is pooled channel by channel: its moments are the pieces'
        moments, concatenated."""
        pieces = self.channel_pieces(name)
        if pieces is not None:
            found = [self.fused_max_moments(p, window) for p in pieces]
            if any(f is None for f in found):
                return None
            sizes = [self.leaf_stats(p).ch_mean.numel() for p in pieces]
            return tuple(torch.cat([f[i].expand(n) if f[i].dim() == 0 else f[i] for f, n in zip(found, sizes)]) for i in (0, 1))
        root = self.roots.get(name)
        if root is None or _skewed(self.leaf_stats(root)):
            return None
        x, w = self._points(root)
        with torch.no_grad():
            vals, _ = self._eval_group(root, x, upto=name)
        y = vals[name].double()
        wc = w.unsqueeze(1) if y.dim() == 2 else w
        falling = torch.zeros_like(y, dtype=torch.bool)
        falling[1:] = y.diff(dim=0) < 0
        # max f(z_i) = f(max z_i) unless all k draws land where f falls (SiLU below -1.28)
        if bool(((wc * falling).sum(0) ** window > 0.01).any()):
            return None
        _, wm = self._points(root, window)
        wm = wm.unsqueeze(1) if y.dim() == 2 else wm
        return self._cols(root, (wm * y).sum(0)), self._cols(root, (wm * _square(y)).sum(0))

    def _forward_fused(self, node: Node, root: str) -> None:
        self.roots[node.name] = root
        self.groups.setdefault(root, []).append(node.name)
        if node.params:  # per-channel parameters: the channels' columns can no longer be shared
            self._inv.pop(root, None)
        self._coarse.pop(root, None)  # kept for a group of one ReLU only (:meth:`_persistence`)
        x, w = self._points(root)
        single = len(self.groups[root]) == 1
        with torch.enable_grad() if single else torch.no_grad():
            z = x.clone().requires_grad_(single)
            vals, _ = self._eval_group(root, z, upto=node.name)
            y = vals[node.name]
            if single:  # the common case (an activation): keep phi' moments for the backward
                d = torch.autograd.grad(y.sum(), z, allow_unused=True)[0] if y.requires_grad else None
                d = torch.zeros_like(z) if d is None else d.detach()
                align = self._value_alignment(root, w, d, x) if self.graph[root].op in _CENTRING else 0.0
                self.single_d2[root] = (*self._derivative_moments(root, w, d), align)
                if self._persists(root, node.name):
                    self._coarse[root] = self._coarse_nodes(root, x, w)
        y = y.detach()
        rs = self.leaf_stats(root)
        mean_u = _expect(w, y)
        mean, m2 = self._cols(root, mean_u), self._cols(root, _expect(w, _square(y)))
        third = self._cols(root, _expect(w, (y.double() - mean_u) ** 3))
        cov = self._coherent(root, mean, m2, y)
        xcov = self._coherent(root, mean, m2, y, cross=True)
        if y.dim() == 2:
            out = Stats.per_channel(rs.axis, mean, m2, cov, rs.pos, xcov)
        else:
            out = make_stats(float(mean), float(m2), xcov=float(xcov) if xcov is not None else 0.0)
            if cov is not None:
                out.pos, out.cov = rs.pos, min(max(float(cov), -out.var), out.var)
        out.set_third(third)
        # a square, an abs, an exp: values >= 0 on every node are described as positive
        out.positive = out.var > 0 and bool((y >= 0).all())
        if not any(self.graph[m].params for m in self.groups[root]):  # the same function on every channel
            out.row_spread = rows.kept_if_equal(rs, out.axis)
        out.prof = _elementwise_profile(rs, out) if out.pos == rs.pos else None
        self.stats[node.name] = [out]

    def _rho(self, root: str, cross: bool = False) -> torch.Tensor | None:
        """The root's coherent correlation cov / var (``cross``: across samples, xcov /
        var; a vector with channels), or None when it has no such part."""
        key = (root, cross)
        if key not in self._rho_cache:
            self._rho_cache[key] = self._compute_rho(root, cross)
        return self._rho_cache[key]

    def _weak_rho(self, root: str, cross: bool = False) -> bool:
        """:func:`_weak` of the root's (not None) :meth:`_rho`, once per root."""
        key = (root, cross)
        if key not in self._weak_cache:
            self._weak_cache[key] = _weak(self._rho(root, cross))
        return self._weak_cache[key]

    def _asymmetric_root(self, root: str) -> bool:
        """:func:`_asymmetric` of the root's statistics, once per root."""
        if root not in self._asym_cache:
            self._asym_cache[root] = _asymmetric(self.leaf_stats(root))
        return self._asym_cache[root]

    def _compute_rho(self, root: str, cross: bool) -> torch.Tensor | None:
        rs = self.leaf_stats(root)
        if (rs.pos is None and not cross) or _skewed(rs):
            return None
        if rs.has_channels:
            _, var = rs.channels(rs.axis, rs.ch_mean.numel())
            cov = rs.cross(rs.axis, var.numel()) if cross else rs.coherent(rs.axis, var.numel())
        else:
            var = torch.tensor(rs.var, dtype=torch.float64)
            cov = torch.tensor(rs.xcov if cross else rs.cov, dtype=torch.float64)
        if not bool((cov != 0).any()):
            return None
        return torch.where(var > 0, cov / var.clamp_min(1e-300), torch.zeros_like(var)).clamp(-1.0, 1.0)

    def _coherent(self, root: str, mean, m2, y: torch.Tensor, cross: bool = False):
        """Cov(f(x_i), f(x_j)) of a fused value y = f(root) (Mehler) for two positions of a
        sample (``cross``: two samples), or None."""
        rs = self.leaf_stats(root)
        if rs.pos is None and not cross:
            return None
        rho = self._rho(root, cross)
        if rho is None:
            return None if cross else torch.zeros_like(mean)
        if self._weak_rho(root, cross):  # first order of Mehler's series: a_1^2 rho
            return self._cols(root, hermite_coefficients(y, y.dim() == 2, 1)[1]) ** 2 * rho
        coef = self._cols(root, hermite_coefficients(y, y.dim() == 2))
        return coherent_moment(coef, (m2 - mean * mean).clamp_min(0.0), rho)

    def _derivative_moments(self, root: str, w: torch.Tensor, d: torch.Tensor) -> tuple:
        """(E[d^2], E[d_i d_j] for two positions of a sample, for two samples) of a
        derivative d on the root's nodes: the gains of a gradient's total, coherent and
        batch-shared parts (E[d]^2 when the root's values are not correlated there)."""
        d2 = self._cols(root, _expect(w, _square(d)))
        d1 = self._cols(root, _expect(w, d))
        out, coef = [d2, d1 * d1, d1 * d1], None
        for k, cross in ((1, False), (2, True)):
            rho = self._rho(root, cross)
            if rho is None or self._weak_rho(root, cross):  # the derivative's own coherence is second order then
                continue
            if coef is None:
                coef = self._cols(root, hermite_coefficients(d, d.dim() == 2))
            out[k] = d1 * d1 + coherent_moment(coef, (d2 - d1 * d1).clamp_min(0.0), rho)
        return tuple(out)

    def _value_alignment(self, root: str, w: torch.Tensor, d: torch.Tensor, x: torch.Tensor):
        """E[d x]^2 - E[x]^2 E[d]^2 for the root's values x and a derivative d on its
        nodes: how much more g_i x_i g_j x_j (g = d u) keeps of u's coherence than a
        gradient independent of x would (0.16 for a ReLU of a centred unit Gaussian)."""
        dx = _expect(w, d * x.to(d.dtype))
        mx, md = _expect(w, x), _expect(w, d)
        return self._cols(root, dx * dx - mx * mx * md * md)

    def _backward_group(self, root: str, acc: dict[tuple[str, int], list]) -> None:
        """Set the gradient of every member of ``root``'s group and add its share to the root.

        For a value t in the group (the root or a member) and each exit o (a member whose
        gradient comes from outside the group), dL/dt = sum_o (do/dt) g_o with g_o
        independent of the forward values, so E[(dL/dt)^2] = sum_o E[(do/dt)^2] E[g_o^2]
        (per channel when the root tracks channels); the coherent parts go with
        E[(do/dt)_i (do/dt)_j] (:meth:`_derivative_moments`). do/dt is the total
        derivative through the chain, by autograd on the quadrature nodes.
        """
        members = self.groups[root]
        at_max: dict[str, list] = {}
        for m in members:
            plain = []
            for part in acc.get((m, 0), []):
                if isinstance(part, _AtMaxPart):
                    at_max.setdefault(m, []).append(part)
                    if not part.counted:
                        plain.append(part.value)
                else:
                    plain.append(part)
            acc[(m, 0)] = plain
            self._resolve(m, 0, acc)
        ext = {m: self._grad_of(m) for m in members}
        if len(members) == 1 and not at_max and root in self.single_d2:
            # one activation: E[(dL/dx)^2] = E[phi'(x)^2] E[(dL/dy)^2], phi' moments from the forward
            d2, ds, dx, align = self.single_d2[root]
            g = ext[members[0]]
            dirs = _directions(d2, dx, g, self._equal_rows(root, members[0]))
            d2 = self._persistence(root, members[0], d2, g)
            acc.setdefault((root, 0), []).append(Grad(d2 * g.g, ds * g.s, dx * g.x, *dirs, g.prof, align * g.s, align * g.x))
            return
        exits = [m for m in members if float(torch.as_tensor(ext[m].g).mean()) > 0]
        x, w = self._points(root)
        # weights under the arg-max distribution, for gradients that came through max pooling
        max_w = {p.window: self._points(root, p.window)[1] for parts in at_max.values() for p in parts}
        max_w = {k: (v.unsqueeze(1) if x.dim() == 2 else v) for k, v in max_w.items()}
        for target in [root] + members:
            total = Grad()
            with torch.enable_grad():
                z = x.clone().requires_grad_(target == root)
                vals, leaf_t = self._eval_group(root, z, upto=members[-1], leaf=target)
                for o in exits:
                    if o == target:
                        total = total + ext[o]
                        continue
                    if leaf_t is None or not vals[o].requires_grad:
                        continue
                    (d,) = torch.autograd.grad(vals[o].sum(), leaf_t, retain_graph=True, allow_unused=True)
                    if d is None:
                        continue
                    d = d.detach().double()
                    d2, ds, dx = self._derivative_moments(root, w, d)
                    align = self._value_alignment(root, w, d, x) if target == root and self.graph[root].op in _CENTRING else 0.0
                    g = ext[o]
                    g_plain = g.g
                    for p in at_max.get(o, []):
                        g_plain = g_plain - p.value.g
                        e_max = self._cols(root, (max_w[p.window] * d * d).sum(0))
                        total = total + Grad(e_max * p.value.g, 0.0, 0.0, prof=g.prof)
                    dirs = _directions(d2, dx, g, self._equal_rows(root, o))
                    total = total + Grad(d2 * g_plain, ds * g.s, dx * g.x, *dirs, g.prof, align * g.s, align * g.x)
            if target == root:
                acc.setdefault((root, 0), []).append(total)
            else:
                _store_grad(self.stats[target][0], total)

    def _persistence(self, root: str, member: str, d2, g: Grad):
        """The ReLU gain P(s > 0) E[r(s) | s > 0] of ``member`` = relu(``root``) under its gradient's
        value profile r (:mod:`~gradaudit.propagation.persistence`): the parts of g that
        came through residual sums ``member + h`` feeding a ReLU are concentrated where
        the stream stays positive. ``d2`` (P(s > 0)) for any other activation or gradient.
        A sum's profile is kept for the ReLU upstream of it."""
        if self.graph[member].op != "relu":
            return d2
        parts = self._sum_parts.get((member, 0), [])
        # the profile at a sum is read by a ReLU that feeds it (the stream's previous block)
        into_sum = self._relu_sum(root)
        if not parts and not into_sum:
            return d2
        ms = self.stats[member][0]
        found = self._coarse.pop(root, None)
        x, w = found if found is not None else self._coarse_nodes(root, *self._points(root))
        total = torch.as_tensor(g.g, dtype=torch.float64)
        profile, weight = torch.zeros_like(x, dtype=torch.float64), torch.zeros_like(total)
        for name, part in parts:
            h = self._sum_other(name, member)
            if h is None or name not in self._value_profile:
                continue
            hs, sign = h
            mean_h, var_h = hs.channels(ms.axis, x.shape[1]) if ms.has_channels else (hs.mean, hs.var)
            nodes, r = self._value_profile[name]
            a = torch.as_tensor(part.g, dtype=torch.float64)
            profile = profile + a * persistence.through_sum(x, nodes, r, sign * mean_h, var_h)
            weight = weight + a
        if not bool((weight > 0).any()):
            profile = torch.ones_like(profile)
        else:  # the other paths' parts carry no profile (1)
            profile = (profile + (total - weight).clamp_min(0.0)) / total.clamp_min(1e-300)
            profile = torch.where(total > 0, profile, torch.ones_like(profile))
        factor, r_s = persistence.after_relu(x, w, profile)
        if into_sum:
            self._value_profile[root] = (x, r_s)
        if not parts:
            return d2
        return d2 * (factor if ms.has_channels else float(factor))

    def _persists(self, root: str, member: str) -> bool:
        """Whether the backward of ReLU ``member`` of ``root`` reads value profiles
        (:meth:`_persistence`): its root is a residual sum with a ReLU input, or it feeds a
        sum."""
        if self.graph[member].op != "relu":
            return False
        return self._relu_sum(root) or any(u.op in ("add", "sub") for u in self.graph.users(member))

    def _relu_sum(self, name: str) -> bool:
        """Whether ``name`` is a sum (or difference) with a ReLU among its inputs."""
        return self.graph[name].op in ("add", "sub") and any(self.graph[s].op == "relu" for s in self.graph[name].inputs)

    def _coarse_nodes(self, root: str, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`persistence.coarse` of the root's quadrature nodes (:meth:`_points`), per channel."""
        x = self._cols(root, x)
        return persistence.coarse(x.unsqueeze(1) if x.dim() == 1 else x, w)

    def _sum_other(self, name: str, member: str) -> tuple[Stats, float] | None:
        """(statistics of h, its sign) when sum node ``name`` is ``member`` +/- h and
        feeds only a ReLU (its gradient is that ReLU's masked one); None otherwise."""
        node = self.graph[name]
        users = self.graph.users(name)
        if len(users) != 1 or users[0].op != "relu" or self.groups.get(name) != [users[0].name]:
            return None
        if node.op not in ("add", "sub") or float(node.kwargs.get("alpha", 1.0)) != 1.0:
            return None
        names = [a.name if isinstance(a, Ref) else None for a in node.args[:2]]
        if len(names) != 2 or names.count(member) != 1 or None in names or (node.op == "sub" and names[0] != member):
            return None
        hs = self.leaf_stats(names[1] if names[0] == member else names[0])
        if hs is None:
            return None
        return hs, (-1.0 if node.op == "sub" else 1.0)

    def _equal_rows(self, root: str, member: str) -> bool:
        """Whether every channel of a row holds the same value at ``root`` and at
        ``member`` (:mod:`~gradaudit.propagation.rows`): a derivative between them is then
        the same along the row."""
        rs, ms = self.leaf_stats(root), self.stats[member][0]
        return rs.axis is not None and rs.axis == ms.axis and rs.equal_rows() and ms.equal_rows()

    def _grad_of(self, name: str) -> Grad:
        return grad_of(self.stats[name][0])

    def _resolve(self, name: str, leaf: int, acc: dict[tuple[str, int], list]) -> None:
        """Sum the gradient contributions a value received from its users."""
        s = self.leaf_stats(name, leaf)
        if s is None:
            return
        total = Grad()
        for i, p in enumerate(acc.get((name, leaf), [])):
            total = p if i == 0 and _as_sum(p) else total + p
        _store_grad(s, total)

    # -- backward ------------------------------------------------------------------
    def _backward(self) -> None:
        acc: dict[tuple[str, int], list] = {}
        for name in self.graph.output_refs:
            for leaf, s in enumerate(self.stats.get(name, [])):
                if s is not None:
                    acc.setdefault((name, leaf), []).append(Grad(1.0, 0.0, 0.0))
        for node in reversed(self.graph.nodes):
            if node.op == "output" or node.name in self.roots:
                continue
            if node.name in self.groups:
                self._backward_group(node.name, acc)
            # arg-max shares that reached a value outside a fused group: a concatenation
            # along channels passes them on to its pieces, any other value drops the mark
            max_parts = [p for p in acc.get((node.name, 0), []) if isinstance(p, _AtMaxPart)]
            if max_parts:
                acc[(node.name, 0)] = [p.value if isinstance(p, _AtMaxPart) else p
                                       for p in acc[(node.name, 0)] if not (isinstance(p, _AtMaxPart) and p.counted)]
                max_parts = max_parts if self.channel_pieces(node.name) is not None else []
            stats = self.stats.get(node.name, [])
            for leaf in range(len(stats)):
                self._resolve(node.name, leaf, acc)
            effect = self.effects.get(node.name)
            if effect is None:
                continue
            # each gain is read once, here: handing it back now keeps the analysis (and
            # whatever runs after it, the probe and a second propagation with gates
            # opened) from holding every layer's channel-gain matrices at once
            gains, effect.gains = effect.gains, []
            for src, in_leaf, out_leaf, gain in gains:
                out = stats[out_leaf] if out_leaf < len(stats) else None
                if out is None:
                    continue
                src_stats = self.leaf_stats(src, in_leaf)
                if src_stats is None:
                    continue
                n_in = src_stats.ch_mean.numel() if src_stats.has_channels else None
                part = apply_gain(gain, grad_of(out), n_in, src_stats.axis)
                if not sets_profile(gain) and not _same_positions(self.graph, src, in_leaf, node, out_leaf, src_stats, out):
                    part.prof = None
                at_max = isinstance(gain, AtMax) or (isinstance(gain, Split) and isinstance(gain.f, AtMax))
                if at_max and (src in self.roots or self.channel_pieces(src) is not None):
                    part = _AtMaxPart(part, (gain.f if isinstance(gain, Split) else gain).window)
                elif max_parts and isinstance(gain, Take):
                    for p in max_parts:  # the slice of each arg-max share, already in ``part``
                        acc.setdefault((src, in_leaf), []).append(
                            _AtMaxPart(apply_gain(gain, p.value, n_in, src_stats.axis), p.window, counted=True))
                elif node.op in ("add", "sub") and self.graph[src].op == "relu":  # read by _persistence
                    self._sum_parts.setdefault((src, in_leaf), []).append((node.name, part))
                acc.setdefault((src, in_leaf), []).append(part)


#: Channels whose laws agree to this fraction of the layer's RMS share quadrature nodes.
DISTINCT_TOL = 1e-4
#: In layers of more than :data:`WIDE_CHANNELS` channels, to this fraction. A channel then
#: takes the moments of its cell's average law (mean and variance averaged over the
#: cell's channels), within about DISTINCT_TOL_WIDE of its own; the layer's averages,
#: which the report reads, move only in second order (the first-order changes of the
#: channels of a cell cancel: their means and variances average to the cell's), about
#: 1e-6. A 70B model's 28,672-channel MLP activations at depth share ~10,000 columns of
#: 256 nodes at 1e-4 and far fewer at 1e-3.
DISTINCT_TOL_WIDE = 1e-3
WIDE_CHANNELS = 4096

#: Normalizations whose backward reads the gradient's correlation with their output.
_CENTRING = frozenset({"batch_norm", "group_norm", "instance_norm"})


def _tensor_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same values: storage, offset, shape, strides, dtype and
    version (the copies of a meta stand-in's shared block are one); None for a tensor
    without plain storage."""
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
    except (RuntimeError, NotImplementedError):
        return None


def _elementwise_profile(root: Stats, out: Stats) -> tuple | None:
    """The position profile of f(x) when x's variance follows ``root.prof``.

    For a positively homogeneous f (ReLU and its kin: f(c z) = c f(z)) of a centred x,
    a position whose variance is a times the average has E[f] = sqrt(a) m1 and E[f^2]
    = a m2 (m1, m2 at the average scale), so its mean square around the channel mean
    mu = m1 mean(sqrt(a)) is a m2 - 2 sqrt(a) m1 mu + mu^2: the mean's own variation
    over positions (milder than a) is part of it. Exact for the identity and ReLU of a
    centred input; an approximation elsewhere."""
    if root.prof is None:
        return None
    m1, m2 = out.mean, out.m2
    shift = abs(root.mean) / math.sqrt(root.var) if root.var > 0 else math.inf
    if shift > 0.5:  # far from centred: homogeneity does not hold, keep the input's profile
        return root.prof
    new = []
    for a in root.prof:
        ra = a.clamp_min(0.0).sqrt()
        mu = m1 * mean_value(ra)
        prof = (a * m2 - 2 * ra * m1 * mu + mu * mu).clamp_min(0.0)
        level = mean_value(prof)
        new.append(prof / level if level > 0 else torch.ones_like(prof))
    return tuple(new)


def _same_positions(graph: Graph, src: str, in_leaf: int, node: Node, out_leaf: int, a: Stats, b: Stats) -> bool:
    """Whether two values have the same position axes of the same sizes (a gradient
    profile carries over)."""
    if a.pos is None or a.pos != b.pos:
        return False
    ma, mb = graph[src].outputs[in_leaf], node.outputs[out_leaf]
    return ma is not None and mb is not None and all(ma.shape[k] == mb.shape[k] for k in a.pos if k < len(ma.shape) and k < len(mb.shape))


def _as_sum(g: Grad) -> bool:
    """Whether ``g`` is what Grad() + g would give, number for number: 0 + v is v, but a
    profile gets averaged (and rounded) and a strided vector comes out contiguous (whose
    later averages sum in another order)."""
    return g.prof is None and all(
        not isinstance(v, torch.Tensor) or v.is_contiguous() for v in (g.g, g.s, g.x, g.es, g.ex)
    )


def _directions(d2, d1sq, g: Grad, equal_rows: bool = False) -> tuple[float, float]:
    """dm, da through multiplication by a derivative d: kept (times d^2) when d is a
    constant (a scale, a sign), lost when it varies (a mask mixes the directions). A
    derivative that varies only from row to row (every channel of a row holds the same
    value) keeps the row-mean direction dm: a row summing to zero still does."""
    d2m, d1m = float(torch.as_tensor(d2).mean()), float(torch.as_tensor(d1sq).mean())
    if d2m > 0 and abs(d2m - d1m) <= 1e-9 * d2m:
        return d2m * g.dm, d2m * g.da
    if equal_rows and d2m > 0:
        return d2m * g.dm, 0.0
    return 0.0, 0.0


def _weak(rho: torch.Tensor) -> bool:
    """A correlation so weak (|rho| < 0.02) that Mehler's series stops at its first term
    (the rest weigh rho^2 < 4e-4 of the variance)."""
    return float(rho.abs().max()) < 0.02


#: Skewness |E[(x - mu)^3]| / sd^3 from which a root is integrated under a shifted Gamma
#: with its skewness (:func:`~gradaudit.propagation.moments.skewed_points`).
SKEW_MIN = 0.05


def _asymmetric(s: Stats) -> bool:
    """A value whose skewness is large enough to change what a function of it does (a
    ReLU of a residual sum that adds a ReLU's output to a Gaussian branch: the Gaussian of
    the same mean and variance puts 6-10% less variance through the ReLU)."""
    if s.k3 == 0.0 and s.ch_k3 is None:
        return False
    if s.has_channels:
        _, var = s.channels(s.axis, s.ch_mean.numel())
        k3 = s.third(s.axis, var.numel())
        return bool((k3.abs() > SKEW_MIN * var.clamp_min(1e-300) ** 1.5).any())
    return abs(s.k3) > SKEW_MIN * max(s.var, 1e-300) ** 1.5


def _skewed(s: Stats) -> bool:
    """A positive value whose Gaussian with the same moments would reach below 0 within
    the quadrature range (10 standard deviations): integrated under a Gamma instead."""
    if not s.positive:
        return False
    if s.has_channels:
        mean, var = s.channels(s.axis, s.ch_mean.numel())
        return bool((mean - 10 * var.sqrt() < 0).any())
    return s.mean - 10 * math.sqrt(s.var) < 0


def grad_of(s: Stats) -> Grad:
    """The gradient moments stored in ``s`` (vectors when it tracks channels)."""
    if s.has_channels and s.ch_g2 is not None:
        return Grad(
            s.ch_g2, s.ch_gs if s.ch_gs is not None else s.gs, s.ch_gx if s.ch_gx is not None else s.gx,
            s.gdm, s.gda, s.gprof, s.ges, s.gex,
        )
    return Grad(s.g2, s.gs, s.gx, s.gdm, s.gda, s.gprof, s.ges, s.gex)


def _store_grad(s: Stats, total: Grad) -> None:
    """Write a gradient's moments into ``s`` (vectors when ``s`` tracks channels)."""
    if s.has_channels:
        vec = total.vector(s.ch_mean.numel())
        s.ch_g2, s.ch_gs, s.ch_gx, s.ges, s.gex = vec.g, vec.s, vec.x, vec.es, vec.ex
        s.g2, s.gs, s.gx = mean_value(vec.g), mean_value(vec.s), mean_value(vec.x)
    else:
        m = total.mean()
        s.g2, s.gs, s.gx, s.ges, s.gex = m.g, m.s, m.x, m.es, m.ex
    s.gdm, s.gda = min(float(total.dm), s.g2), min(float(total.da), s.g2)
    s.gprof = total.prof if s.pos is not None and total.prof is not None and len(total.prof) == len(s.pos) else None


def _copy(s: Stats) -> Stats:
    return Stats(
        mean=s.mean, m2=s.m2, axis=s.axis, ch_mean=s.ch_mean, ch_m2=s.ch_m2, pos=s.pos, cov=s.cov, ch_cov=s.ch_cov,
        xcov=s.xcov, ch_xcov=s.ch_xcov, k3=s.k3, ch_k3=s.ch_k3, positive=s.positive, row_var=s.row_var, prof=s.prof, row_spread=s.row_spread,
    )


def _expect(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_k w_k values[k] over quadrature nodes (dim 0): a float64 scalar or vector."""
    if values.dim() == 2:  # (nodes, C): one matrix-vector product in the values' dtype
        return (w.to(values.dtype) @ values).double()
    return (w * values.double()).sum()


def _square(values: torch.Tensor) -> torch.Tensor:
    """values^2 in float64: the per-channel nodes are float32, whose squares overflow from
    |x| ~ 1.8e19 on although float32 holds the values themselves (activations of deep
    unnormalised networks reach that). A product, not ``pow(2)``: the same bits in half
    the time."""
    v = values.double()
    return v * v


def propagate(graph: Graph, input_stats: dict[str, Stats | tuple[float, float]] | None = None) -> Analysis:
    """Forward and backward moment propagation over ``graph`` (on one intra-op thread:
    :mod:`gradaudit.serial`)."""
    with serial():
        return Engine(graph, input_stats).run()


