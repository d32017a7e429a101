"""One table of op handlers: forward second moments and backward gradient gains.

Every handler is a small pure function ``handler(ctx) -> Effect`` registered under the
normalised op names it serves. Given the statistics of its inputs (``ctx.stat``) it
returns the statistics of its outputs and, for each (input, output) pair, the *gain*
by which the second moment of dL/d(output) multiplies into dL/d(input):

    E[(dL/dx)^2] = sum over outputs y of gain(x, y) * E[(dL/dy)^2]

Backward maps are linear in the cotangent, so under the mean-field gradient
independence assumption (Schoenholz et al., ICLR 2017) second moments combine linearly
and gains are all we need. Forward statistics are per-element averages:
``mean`` = E[x] and ``m2`` = E[x^2] over the elements of a tensor.

Elementwise ops (activations, arithmetic on a single source) are not in this table:
the engine fuses them and evaluates them exactly by quadrature
(:mod:`gradaudit.propagation.moments`). Ops nobody handles are estimated by
:func:`gradaudit.propagation.montecarlo.estimate` and reported as estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Callable

import torch

from gradaudit.ir import Node, Ref, Stats, TensorMeta
from gradaudit.propagation import channels, rows
from gradaudit.propagation.moments import gaussian_points, inverse_moment, max_of_k_weights

HANDLERS: dict[str, Callable[["Ctx"], "Effect"]] = {}


class Unhandled(Exception):
    """Raised by a handler for a variant it cannot model; the engine then estimates."""


def handles(*ops: str):
    """Register a handler for one or more normalised op names."""

    def deco(fn):
        for op in ops:
            if op in HANDLERS:
                raise ValueError(f"op {op!r} registered twice")
            HANDLERS[op] = fn
        return fn

    return deco


@dataclass
class Effect:
    """What a handler computed: output statistics and backward gains.

    ``gains`` holds ``(input node name, input leaf, output leaf, gain)`` tuples.
    """

    out: list[Stats | None]
    gains: list[tuple[str, int, int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Ctx:
    """What a handler may read: its node, input statistics and constant tensors."""

    def __init__(self, node: Node, engine) -> None:
        self.node = node
        self.engine = engine

    # -- arguments ---------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name`` of the call."""
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute of the called module (``stride``, ``eps``...)."""
        return getattr(self.node.fn, name, default)

    def stat(self, ref: Ref, leaf: int = 0) -> Stats:
        s = self.engine.leaf_stats(ref.name, leaf)
        if s is None:
            raise Unhandled(f"input '{ref.name}' has no floating statistics")
        return s

    def meta(self, ref: Ref, leaf: int = 0) -> TensorMeta:
        m = self.engine.graph[ref.name].outputs[leaf]
        if m is None:
            raise Unhandled(f"input '{ref.name}' has no tensor metadata")
        return m

    def const(self, ref: Any) -> torch.Tensor | None:
        """The real tensor behind ``ref`` when it is a parameter or constant."""
        if isinstance(ref, torch.Tensor):
            return ref
        if isinstance(ref, Ref):
            node = self.engine.graph[ref.name]
            if node.op == "param":
                return node.params.get("value")
        return None

    def param(self, name: str) -> torch.Tensor | None:
        p = self.node.params.get(name)
        return p.detach() if p is not None else None

    @property
    def out_meta(self) -> TensorMeta:
        m = self.node.outputs[0]
        if m is None:
            raise Unhandled("output is not a tensor")
        return m

    def first_ref(self) -> Ref:
        for a in self.node.args:
            if isinstance(a, Ref):
                return a
        for a in self.node.kwargs.values():
            if isinstance(a, Ref):
                return a
        raise Unhandled("no tensor input")


def _stats(mean: float, m2: float, pos: tuple[int, ...] | None = None, cov: float = 0.0) -> Stats:
    s = Stats(mean=float(mean), m2=max(float(m2), float(mean) ** 2))
    if pos is not None:
        s.pos, s.cov = pos, min(max(float(cov), -s.var), s.var)
    return s


def _ratio(a: TensorMeta, b: TensorMeta) -> float:
    return a.numel / b.numel if b.numel else 0.0


def _positions(meta: TensorMeta, axes) -> int:
    """Number of positions (product of the sizes of the position axes)."""
    return math.prod(meta.shape[a] for a in axes) if axes else 1


# --------------------------------------------------------------------------- layout
def _keep(s: Stats) -> Stats:
    """A copy of ``s`` (channel detail, coherence and row statistics included) for an
    output with the same values."""
    out = _moved(s, s.axis if s.has_channels else None, 1, s.pos)
    out.row_var, out.positive, out.prof = s.row_var, s.positive, s.prof
    return out


def _moved(s: Stats, axis: int | None, r: int = 1, pos: tuple[int, ...] | None = None, cov_to: float = 0.0) -> Stats:
    """``s`` with its channels now on ``axis`` (each repeated r times) or scalar, its
    positions on ``pos``; ``cov_to`` in [0, 1] moves the coherent covariance that far
    toward the variance (copies along position axes)."""
    if axis is None or not s.has_channels:
        base = s.scalar() if s.has_channels else s
        cov = base.cov + cov_to * (base.var - base.cov) if pos is not None else 0.0
        return _stats(s.mean, s.m2, pos, cov)
    mean, m2 = s.ch_mean, s.ch_m2
    cov = s.coherent(s.axis, mean.numel()) if pos is not None else None
    if cov is not None and cov_to:
        cov = cov + cov_to * ((m2 - mean * mean).clamp_min(0.0) - cov)
    if r != 1:
        mean, m2 = mean.repeat_interleave(r), m2.repeat_interleave(r)
        cov = cov.repeat_interleave(r) if cov is not None else None
    return Stats.per_channel(axis, mean, m2, cov, pos)


_SAME_LAYOUT = frozenset({"identity", "contiguous", "clone", "to", "alias", "cpu", "cuda", "flip", "roll", "narrow"})


def _axis_map(ctx: Ctx, in_meta: TensorMeta) -> Callable[[int], int | None] | None:
    """Where each input axis goes (None: merged or dropped), for layout ops that move
    whole axes; None when the op reshapes (see :func:`channels.reshaped_positions`)."""
    op, nd, out_nd = ctx.node.op, len(in_meta.shape), len(ctx.out_meta.shape)
    if op in _SAME_LAYOUT or op == "repeat_interleave":
        return lambda a: a
    if op == "permute":
        dims = ctx.node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if "dims" in ctx.node.kwargs:
            dims = ctx.node.kwargs["dims"]
        return lambda a: channels.permuted_axis(a, dims, nd)
    if op in ("transpose", "t", "movedim"):
        if op == "movedim":
            src = channels.normalize_axis(ctx.arg(1, "source", 0), nd)
            dst = channels.normalize_axis(ctx.arg(2, "destination", 0), nd)
            order = [k for k in range(nd) if k != src]
            order.insert(dst, src)
            return lambda a: order.index(a)
        d0, d1 = (ctx.arg(1, "dim0", 0), ctx.arg(2, "dim1", 1)) if op == "transpose" else (0, 1)
        d0, d1 = channels.normalize_axis(d0, nd), channels.normalize_axis(d1, nd)
        return lambda a: {d0: d1, d1: d0}.get(a, a)
    if op == "select":
        d = channels.normalize_axis(ctx.arg(1, "dim", 0), nd)
        return lambda a: None if a == d else (a - 1 if a > d else a)
    if op in ("expand", "repeat", "tile"):
        return lambda a: a + out_nd - nd
    return None


def _layout_axis(ctx: Ctx, s: Stats, in_meta: TensorMeta) -> tuple[int | None, int]:
    """Where the channel axis goes through a permutation or reshape (None: mixed)."""
    if not s.has_channels:
        return None, 1
    out_shape = ctx.out_meta.shape
    moves = _axis_map(ctx, in_meta)
    if moves is not None:
        axis = moves(s.axis)
        if axis is None or out_shape[axis] != in_meta.shape[s.axis]:
            return None, 1
        return axis, 1
    found = channels.reshaped_axis(in_meta.shape, s.axis, out_shape) if ctx.node.op in _RESHAPES else None
    return found if found is not None else (None, 1)


_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})


def _layout_positions(ctx: Ctx, s: Stats, in_meta: TensorMeta) -> tuple[int, ...] | None:
    """Where the position axes go; size-1 axes and positions mixed into other axes drop."""
    if s.pos is None:
        return None
    out_shape = ctx.out_meta.shape
    moves = _axis_map(ctx, in_meta)
    if moves is not None:
        pos = [moves(a) for a in s.pos]
        pos = [a for a in pos if a is not None and out_shape[a] > 1]
        return tuple(sorted(pos)) or None
    if ctx.node.op in _RESHAPES:
        return channels.reshaped_positions(s.pos, in_meta.shape, out_shape)
    return None


def _copies_on_positions(ctx: Ctx, in_meta: TensorMeta, pos: tuple[int, ...] | None) -> bool:
    """Whether an op that copies values (expand, repeat) copies them along position axes only."""
    if pos is None:
        return False
    out_shape, nd = ctx.out_meta.shape, len(ctx.out_meta.shape)
    in_shape = (1,) * (nd - len(in_meta.shape)) + tuple(in_meta.shape)
    grown = [a for a in range(nd) if out_shape[a] != in_shape[a]]
    return bool(grown) and all(a in pos for a in grown)


@handles(
    "identity", "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t",
    "contiguous", "squeeze", "unsqueeze", "expand", "repeat", "to", "clone", "flip",
    "roll", "narrow", "select", "movedim", "tile", "repeat_interleave",
    "alias", "cpu", "cuda",
)
def layout(ctx: Ctx) -> Effect:
    """Reshuffle, copy or subset elements: values keep their statistics.

    The gradient of an input element is the sum of the gradients of its copies, so the
    per-element gain is numel(out) / numel(in) (1 for a permutation, r for r copies,
    k/n for a subset of k out of n). Channels are followed through permutations and
    reshapes that keep them intact (``flatten`` after a conv repeats each channel's
    statistics over its spatial block), and so are position axes (merged positions stay
    positions; positions merged into channels are lost).

    Copies along position axes (``expand`` of a per-sample vector over an image) are
    coherent: two positions share a source with probability q = (r - 1) / (P - 1), so
    cov_out = cov + q (var - cov); their gradients add coherently: an input receives
    r (g - s) + r^2 s (:class:`channels.Split`, f = r, c = r^2).
    """
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    in_meta = ctx.meta(ref)
    ratio = _ratio(ctx.out_meta, in_meta)
    axis, r = _layout_axis(ctx, s, in_meta)
    pos = _layout_positions(ctx, s, in_meta)
    copies = ratio > 1 and _copies_on_positions(ctx, in_meta, pos)
    q = 0.0
    if copies:
        p_out = _positions(ctx.out_meta, pos)
        q = (ratio - 1) / (p_out - 1) if p_out > 1 else 0.0
    out = _moved(s, axis, r, pos, cov_to=q)
    if pos is not None and pos == s.pos and all(ctx.out_meta.shape[a] == in_meta.shape[a] for a in pos):
        out.prof = s.prof
    if axis is None:
        gain: Any = ratio
    elif r == 1:
        gain = channels.Diag(ratio)
    else:
        gain = channels.Regroup(r)
    if copies:
        per = (lambda k: channels.Diag(k)) if axis is not None and r == 1 else (lambda k: k)
        gain = channels.Split(per(ratio), per(ratio * ratio))
    return Effect([out], [(ref.name, 0, 0, gain)])


@handles("getitem")
def getitem(ctx: Ctx) -> Effect:
    """Tuple indexing passes one output through; tensor indexing takes a subset."""
    src, index = ctx.node.args[0], ctx.node.args[1]
    if not isinstance(src, Ref):
        raise Unhandled("getitem of a non-node")
    src_node = ctx.engine.graph[src.name]
    if src_node.tuple_output and isinstance(index, int):
        sub = src_node.structure[index]
        leaves = list(_leaves(sub))
        out, gains = [], []
        for k, leaf in enumerate(leaves):
            s = ctx.engine.leaf_stats(src.name, leaf)
            out.append(None if s is None else _keep(s))
            gains.append((src.name, leaf, k, channels.Diag(1.0)))
        return Effect(out, gains)
    if isinstance(index, Ref) or (isinstance(index, tuple) and any(isinstance(i, Ref) for i in index)):
        raise Unhandled("indexing with a tensor")
    s = ctx.stat(src)
    # slicing keeps the layout (same number of axes): positions stay positions
    pos = s.pos if len(ctx.out_meta.shape) == len(ctx.meta(src).shape) else None
    base = s.scalar() if s.has_channels else s
    return Effect([_stats(s.mean, s.m2, pos, base.cov)], [(src.name, 0, 0, _ratio(ctx.out_meta, ctx.meta(src)))])


def _leaves(structure: Any):
    if isinstance(structure, int):
        yield structure
    else:
        for s in structure:
            yield from _leaves(s)


@handles("split", "chunk", "unbind", "tensor_split", "split_with_sizes")
def split(ctx: Ctx) -> Effect:
    """Pieces of one tensor: each keeps the statistics, each passes its gradient back.

    Split along the channel axis: each piece carries its own channels."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    in_meta = ctx.meta(ref)
    dim = ctx.arg(2, "dim", 0) if ctx.node.op != "unbind" else ctx.arg(1, "dim", 0)
    dim = channels.normalize_axis(dim, len(in_meta.shape)) if isinstance(dim, int) else None
    out, gains = [], []
    start = 0
    for k, meta in enumerate(ctx.node.outputs):
        if meta is None:
            out.append(None)
            continue
        pos = s.pos if ctx.node.op != "unbind" else None
        if s.has_channels and dim == s.axis and ctx.node.op != "unbind":
            stop = start + meta.shape[dim]
            cov = s.coherent(s.axis, s.ch_mean.numel())[start:stop] if pos is not None else None
            out.append(Stats.per_channel(s.axis, s.ch_mean[start:stop], s.ch_m2[start:stop], cov, pos))
            gains.append((ref.name, 0, k, channels.Place(start, stop, in_meta.shape[dim])))
            start = stop
        elif s.has_channels and dim != s.axis:
            axis = s.axis - 1 if ctx.node.op == "unbind" and dim is not None and dim < s.axis else s.axis
            out.append(_moved(s, axis, 1, pos))
            gains.append((ref.name, 0, k, channels.Diag(meta.numel / in_meta.numel)))
        else:
            out.append(_moved(s, None, 1, pos))
            gains.append((ref.name, 0, k, meta.numel / in_meta.numel))
    return Effect(out, gains)


@handles("cat", "stack", "hstack", "vstack", "concat")
def cat(ctx: Ctx) -> Effect:
    """Concatenation: a numel-weighted mixture forward, gain 1 to every piece.

    Along the channel axis the channel vectors are concatenated; along another axis
    the per-channel statistics mix in proportion to each piece's size."""
    tensors = ctx.arg(0, "tensors")
    refs = [t for t in tensors if isinstance(t, Ref)]
    total = sum(ctx.meta(r).numel for r in refs)
    mean = sum(ctx.stat(r).mean * ctx.meta(r).numel for r in refs) / total
    m2 = sum(ctx.stat(r).m2 * ctx.meta(r).numel for r in refs) / total
    nd = len(ctx.out_meta.shape)
    dim = ctx.arg(1, "dim", 0)
    stats = [ctx.stat(r) for r in refs]
    axis = stats[0].axis if all(st.has_channels for st in stats) else None
    if ctx.node.op in ("cat", "concat") and isinstance(dim, int) and axis is not None and all(st.axis == axis for st in stats):
        dim = channels.normalize_axis(dim, nd)
        pos = _shared_positions(stats)
        if dim == axis:
            covs = torch.cat([st.coherent(axis, st.ch_mean.numel()) for st in stats]) if pos is not None else None
            out = Stats.per_channel(axis, torch.cat([st.ch_mean for st in stats]), torch.cat([st.ch_m2 for st in stats]), covs, pos)
            gains, start = [], 0
            for r, st in zip(refs, stats):
                stop = start + st.ch_mean.numel()
                gains.append((r.name, 0, 0, channels.Take(start, stop)))
                start = stop
            return Effect([out], gains)
        if len({st.ch_mean.numel() for st in stats}) == 1:
            w = [ctx.meta(r).numel / total for r in refs]
            cm = sum(wi * st.ch_mean for wi, st in zip(w, stats))
            c2 = sum(wi * st.ch_m2 for wi, st in zip(w, stats))
            cv = sum(wi * st.coherent(axis, st.ch_mean.numel()) for wi, st in zip(w, stats)) if pos is not None else None
            return Effect([Stats.per_channel(axis, cm, c2, cv, pos)], [(r.name, 0, 0, channels.Diag(1.0)) for r in refs])
    pos = _shared_positions(stats) if ctx.node.op in ("cat", "concat") else None
    cov = sum(st.cov * ctx.meta(r).numel for r, st in zip(refs, stats)) / total if pos is not None else 0.0
    return Effect([_stats(mean, m2, pos, cov)], [(r.name, 0, 0, 1.0) for r in refs])


def _shared_positions(stats: list[Stats]) -> tuple[int, ...] | None:
    """The position axes of several values, when they all agree."""
    pos = {st.pos for st in stats}
    return pos.pop() if len(pos) == 1 else None


@handles("detach")
def detach(ctx: Ctx) -> Effect:
    """Same values, no gradient."""
    ref = ctx.first_ref()
    return Effect([_keep(ctx.stat(ref))], [(ref.name, 0, 0, 0.0)])


@handles("pad")
def pad(ctx: Ctx) -> Effect:
    """Constant padding with value c: a mixture of the input and c; gain 1 to the input."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    mode = ctx.arg(2, "mode", "constant")
    if mode != "constant":
        return layout(ctx)
    c = float(ctx.arg(3, "value", 0.0) or 0.0)
    frac = 1.0 / _ratio(ctx.out_meta, ctx.meta(ref))
    base = s.scalar() if s.has_channels else s
    out = _stats(frac * s.mean + (1 - frac) * c, frac * s.m2 + (1 - frac) * c * c, s.pos, frac * frac * base.cov)
    return Effect([out], [(ref.name, 0, 0, 1.0)])


# --------------------------------------------------------------------------- dense
def _dense(
    x: Stats, in_axis: int, w2: torch.Tensor, wsum: torch.Tensor, bias: torch.Tensor | None, out_axis: int,
    coherent: torch.Tensor | None = None, pos: tuple[int, ...] | None = None, power: torch.Tensor | None = None,
    scale: float = 1.0, coherent_scale: float = 1.0,
) -> Stats:
    """y_c = sum_c' W_cc' x_c' + b_c with independent inputs of per-channel mean mu_c'
    and variance v_c' (He et al. 2015; Glorot & Bengio 2010):

        E[y_c] = sum_c' W_cc' mu_c' + b_c,   Var[y_c] = sum_c' W_cc'^2 v_c'

    ``w2`` / ``wsum`` are the (C_out, C_in) matrices of summed squared / plain weights
    (for a conv: over the kernel taps that read real inputs, per output position). The
    weights are the ones the user actually initialised. ``scale`` divides ``w2``,
    ``wsum`` and ``power`` (a conv's 1 / N_out), ``coherent_scale`` ``coherent``.

    The part s_c' of v_c' shared by all positions of a sample goes through the map the
    layer applies to a constant input (a conv sums its taps first: (sum_t W_t)^2
    instead of sum_t W_t^2; a linear layer acts on one position: W^2 itself). ``power``
    is the average over positions of that map's square, ``coherent`` the square of its
    average (what stays shared by the positions; they differ at a conv's borders):

        Var[y_c] = sum_c' W2_cc' (v_c' - s_c') + sum_c' Pow_cc' s_c',  s_out = C s
    """
    mean_in, var_in = x.channels(in_axis, w2.shape[1])
    mean = (wsum @ mean_in) * scale
    if bias is not None:
        mean = mean + bias.detach().double().reshape(-1)
    cov_out = None
    if pos is not None and x.pos is not None:
        cov_in = x.coherent(in_axis, w2.shape[1])
        if coherent is None:
            coherent, coherent_scale = w2, scale
        cov_out = (coherent @ cov_in) * coherent_scale
        if power is None:
            var = (w2 @ var_in) * scale
        else:
            var = (w2 @ (var_in - cov_in) + power @ cov_in) * scale
    else:
        var = (w2 @ var_in) * scale
    return Stats.per_channel(out_axis, mean, var + mean * mean, cov_out, pos)


def _dense_forward(x: Stats, weight: torch.Tensor, bias: torch.Tensor | None) -> Stats:
    """:func:`_dense` for a (C_out, C_in) weight on a tensor without channel detail."""
    w = weight.detach().double()
    return _dense(x.scalar(), 0, w * w, w, bias, 0, pos=x.pos).scalar()


@handles("linear")
def linear(ctx: Ctx) -> Effect:
    """Fully connected layer, per output feature (see :func:`_dense`).

    Inputs whose channels all hold the same value (a spread of 0,
    :mod:`gradaudit.propagation.rows`) add up coherently: Var[y_i] = (sum_j W_ij)^2 Var[x].

    Backward: dL/dx_j = sum_i W_ij dL/dy_i, so E[(dL/dx_j)^2] = sum_i W_ij^2
    E[(dL/dy_i)^2]; with uniform output gradients the gain is ||W||_F^2 / fan_in.
    A gradient whose rows sum to zero goes through the centred weight instead. The
    same map acts at every position, so coherent gradient parts go the same way.
    A linear layer over a position axis (token mixing) mixes positions: coherence is
    dropped there.
    """
    ref = ctx.arg(0, "input")
    if ctx.node.kind == "call_module":
        weight, bias = ctx.param("weight"), ctx.param("bias")
    else:
        weight, bias = ctx.const(ctx.arg(1, "weight")), ctx.const(ctx.arg(2, "bias"))
        if weight is None:
            raise Unhandled("linear with a computed weight")
    x = ctx.stat(ref)
    w = weight.detach().double()
    w2 = w * w
    in_axis = len(ctx.meta(ref).shape) - 1
    pos = x.pos if x.pos is not None and in_axis not in x.pos else None
    # inputs whose channels all hold the same value c: y_i = (sum_j W_ij) c, Var[y_i] =
    # (sum_j W_ij)^2 Var[c] -- the matrix W_ij sum_j W_ij has those row sums
    w2_fwd = w * w.sum(1, keepdim=True) if x.axis == in_axis and x.equal_rows() else w2
    out = _dense(x, in_axis, w2_fwd, w, bias, len(ctx.out_meta.shape) - 1, pos=pos)
    var_in = x.channels(in_axis, w.shape[1])[1]
    out.row_spread = rows.dense(weight, bias, var_in, out.ch_mean)
    centred = cache(lambda: rows.centred(weight).pow(2))
    return Effect([out], [(ref.name, 0, 0, channels.Mat(w2, axis=in_axis, centred=centred))])


def valid_taps(n_in: int, n_out: int, k: int, stride: int, pad: int, dil: int) -> list[int]:
    """For each kernel tap j, how many output positions o read a real (unpadded) input:
    #{o in [0, n_out) : 0 <= o*stride + j*dil - pad < n_in}."""
    counts = []
    for j in range(k):
        off = j * dil - pad
        counts.append(sum(1 for o in range(n_out) if 0 <= o * stride + off < n_in))
    return counts


@lru_cache(maxsize=1024)
def tap_classes(n_strided: int, n_dense: int, k: int, stride: int, pad: int, dil: int, dense_side: bool) -> tuple[tuple[int, tuple], ...]:
    """Positions grouped by the kernel taps that reach them, along one spatial dim:
    [(number of positions, 0/1 mask over the k taps)].

    On the strided side (a conv's output o), tap t is valid when o*s + t*d - pad reads a
    real input; on the dense side (a conv's input p), when some output o in range reads
    p through t. Interior positions share one class; borders make the others."""
    found: dict[tuple, int] = {}
    for i in range(n_dense if dense_side else n_strided):
        if dense_side:
            mask = tuple(
                int((i + pad - t * dil) % stride == 0 and 0 <= (i + pad - t * dil) // stride < n_strided) for t in range(k)
            )
        else:
            mask = tuple(int(0 <= i * stride + t * dil - pad < n_dense) for t in range(k))
        found[mask] = found.get(mask, 0) + 1
    return tuple((n, m) for m, n in found.items())


@lru_cache(maxsize=512)
def _class_masks(per_dim: tuple[tuple[tuple[int, tuple], ...], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of per-dim classes: masks (K, n_classes) over the flattened kernel and
    counts (n_classes,). Cached: callers must not modify them."""
    masks, counts = [torch.ones(1)], [1]
    for classes in per_dim:
        new_m, new_c = [], []
        for m, c in zip(masks, counts):
            for n, dm in classes:
                new_m.append(torch.outer(m, torch.tensor(dm, dtype=torch.float32)).reshape(-1))
                new_c.append(c * n)
        masks, counts = new_m, new_c
    return torch.stack(masks, 1), torch.tensor(counts, dtype=torch.float64)


def _taps(counts: list[list[int]]) -> torch.Tensor:
    """prod_d count_d[t_d] over the flattened kernel (float32)."""
    taps = torch.ones(())
    for cnt in counts:
        taps = torch.outer(taps.reshape(-1), torch.tensor(cnt, dtype=torch.float32))
    return taps.reshape(-1)


def _tap_weighted(block: torch.Tensor, taps: torch.Tensor, power: int) -> torch.Tensor:
    """sum over taps t of W[:, :, t]^power * taps[t] -> (C_out, C_in); with ``taps`` of
    shape (K, m), m such sums at once -> (C_out, C_in, m) (one pass over the weights)."""
    w = block.reshape(block.shape[0] * block.shape[1], -1)
    if power == 2:
        w = w * w
    out = w @ taps.to(w.dtype)
    return out.reshape(block.shape[0], block.shape[1], *taps.shape[1:]).double()


#: Convolutions with fewer input channels per group than this get their coherent
#: part's power from the exact partial tap sums (cheap for them, and it matters: a
#: depthwise kernel's (sum_t W_t)^2 differs from sum_t W_t^2 channel by channel). With
#: more, the partial sums' squares average to the tap-wise squares over input channels.
EXACT_PARTIAL_SUMS = 16


def _partial_sum_power(block: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """(C_out, C_in) average over positions of (sum of the taps valid there)^2."""
    s = block.reshape(block.shape[0] * block.shape[1], -1) @ masks  # (rows, classes)
    return ((s.double() ** 2) @ counts / n).reshape(block.shape[0], block.shape[1])


def _tap_means(blocks: list[torch.Tensor], mean_in: torch.Tensor) -> torch.Tensor:
    """(C_out, K): the input channel means through each kernel tap, sum_c' W[c, c', t] mu_c'."""
    per_group, start = [], 0
    for blk in blocks:
        co, ci = blk.shape[0], blk.shape[1]
        per_group.append(torch.matmul(mean_in[start : start + ci].to(blk.dtype), blk.reshape(co, ci, -1)))
        start = start + ci if len(blocks) > 1 else start
    return torch.cat(per_group, 0).double()


def _mean_map_m2(tap_means: torch.Tensor, bias, masks: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """Per output channel, the average over positions of the squared deterministic part
    (the input means through the taps valid at each position, plus the bias): border
    positions see fewer taps, so the mean is not the same everywhere."""
    per_class = tap_means @ masks.double()  # (C_out, classes)
    if bias is not None:
        per_class = per_class + bias.detach().double().reshape(-1, 1)
    return (per_class**2) @ counts / n


def _conv_blocks(weight: torch.Tensor, groups: int, transposed: bool) -> list[torch.Tensor]:
    """The weight as per-group (C_out/g, C_in/g, *k) blocks, whatever the conv type."""
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    if not transposed:  # (C_out, C_in/g, *k)
        return list(w.chunk(groups, 0))
    # transposed: (C_in, C_out/g, *k)
    return [blk.transpose(0, 1) for blk in w.chunk(groups, 0)]


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@handles("conv", "conv1d", "conv2d", "conv3d", "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(ctx: Ctx) -> Effect:
    """Convolution and transposed convolution, per channel, with exact border effects.

    y[c, o] = sum over (c', tap t valid at o) of W[c, c', t] x[c', o + t]. With N_t the
    number of output positions at which tap t reads a real input (not zero padding):

        Var[y_c] = sum_{c', t} W[c,c',t]^2 v_c' N_t / N_out       (averaged over o)
        E[(dL/dx_c')^2] = sum_{c, t} W[c,c',t]^2 g2_c N_t / N_in

    A transposed convolution is the adjoint of a convolution, so the same sums serve
    with input and output positions exchanged. Groups make the channel matrices
    block-diagonal.

    A part of the input shared by all positions of a sample sees the kernel summed over
    the taps valid at each position: its power is the average over positions of (that
    partial sum)^2, and what stays shared by the positions is the square of the average
    partial sum S_cc' = sum_t W[c,c',t] N_t / N_out; a gradient part shared by all
    positions maps the same way (sums over input positions). For a depthwise kernel
    (sum_t W_t)^2 and sum_t W_t^2 differ channel by channel; with many input channels
    per group their sum over inputs averages to the tap-wise squares, and the shared
    part goes like the rest. The mean also varies over positions at the borders (fewer
    taps): its square is averaged over the position classes. Position axes of the
    output: its spatial axes.
    """
    node = ctx.node
    transposed = node.op.startswith("conv_transpose")
    ref = ctx.arg(0, "input")
    x_meta = ctx.meta(ref)
    y_meta = ctx.out_meta
    if node.kind == "call_module":
        m = node.fn
        weight, bias = ctx.param("weight"), ctx.param("bias")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
        zero_pad = getattr(m, "padding_mode", "zeros") == "zeros"
    else:
        weight, bias = ctx.const(ctx.arg(1, "weight")), ctx.const(ctx.arg(2, "bias"))
        if weight is None:
            raise Unhandled("convolution with a computed weight")
        stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
        dilation = ctx.arg(7 if transposed else 5, "dilation", 1)
        groups = ctx.arg(6, "groups", 1)
        zero_pad = True
    nd = weight.dim() - 2
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    ksize = tuple(weight.shape[2:])
    x_sp, y_sp = x_meta.shape[-nd:], y_meta.shape[-nd:]
    if isinstance(padding, str):
        padding = (0,) * nd if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, ksize))
    padding = _tuple(padding, nd)
    # o runs over the strided side, p = o*s + t*d - pad over the dense side
    o_sp, p_sp = (x_sp, y_sp) if transposed else (y_sp, x_sp)
    if zero_pad:
        counts = [valid_taps(p_sp[d], o_sp[d], ksize[d], stride[d], padding[d], dilation[d]) for d in range(nd)]
        side = [
            _class_masks(tuple(tap_classes(o_sp[d], p_sp[d], ksize[d], stride[d], padding[d], dilation[d], dense) for d in range(nd)))
            for dense in (transposed, not transposed)  # (output side, input side)
        ]
    else:  # reflect / replicate / circular padding: every tap reads a real value
        counts = [[o_sp[d]] * ksize[d] for d in range(nd)]
        side = [_class_masks(tuple(((sp[d], (1,) * ksize[d]),) for d in range(nd))) for sp in (y_sp, x_sp)]
    blocks = _conv_blocks(weight, groups, transposed)
    n_x, n_y = math.prod(x_sp), math.prod(y_sp)
    axis_in, axis_out = len(x_meta.shape) - nd - 1, len(y_meta.shape) - nd - 1
    pos = tuple(range(axis_out + 1, len(y_meta.shape)))
    x = ctx.stat(ref)
    # positions differ in variance (borders of a deep zero-padded stack): each tap's count
    # of valid positions is weighted by the input's profile, and the output gets its own
    prof_in = x.prof if x.pos == tuple(range(axis_in + 1, len(x_meta.shape))) else None
    prof_out, geometry, fwd_total = None, None, 1.0
    if zero_pad:
        geo = [(o_sp[d], p_sp[d], ksize[d], stride[d], padding[d], dilation[d]) for d in range(nd)]
        weighted = [channels.conv_counts(prof_in[d] if prof_in is not None else None, geo[d] + (transposed,)) for d in range(nd)]
        counts = [c for c, _ in weighted]
        prof_out = tuple(p for _, p in weighted)
        fwd_total = math.prod(sum(c) for c in counts)
        geometry = tuple(g + (not transposed,) for g in geo)
    c_in = sum(b.shape[1] for b in blocks) if len(blocks) > 1 else blocks[0].shape[1]
    mean_in, var_in = x.channels(axis_in, c_in)
    (mask_y, cnt_y), (mask_x, cnt_x) = side
    taps = _taps(counts)
    dense = blocks[0].shape[1] >= EXACT_PARTIAL_SUMS
    w2 = _block_diag([_tap_weighted(b, taps, 2) for b in blocks])
    tap_means = _tap_means(blocks, mean_in)
    mean = tap_means @ taps.double() / n_y
    if bias is not None:
        mean = mean + bias.detach().double().reshape(-1)
    if mask_y.shape[1] > 1:  # borders: the mean differs between positions
        m2_mean = _mean_map_m2(tap_means, bias, mask_y, cnt_y, n_y).maximum(mean * mean)
    else:
        m2_mean = mean * mean
    one_group = len(blocks) == 1
    centred = cache(lambda: _tap_weighted(rows.centred(blocks[0]), taps, 2)) if one_group else None
    fluct = channels.Mat(w2, axis=axis_in, scale=1.0 / n_x, centred=centred)

    def with_spread(out: Stats) -> Stats:
        if one_group:
            out.row_spread = rows.dense(blocks[0], bias, var_in, out.ch_mean, taps, n_y)
        return out
    wrap = (lambda g: channels.Profiled(g, geometry, fwd_total)) if geometry is not None else (lambda g: g)  # noqa: E731
    if dense:
        # many inputs per output: over input channels (sum_t W_t)^2 averages to sum_t
        # W_t^2 (the shared part's power goes like the rest), and the square of the average
        # partial sum to sum_t W_t^2 (N_t / N)^2 -- with the taps' energies alike (random
        # weights), w2 times sum_t N_t^2 / (N sum_t N_t): on small maps, where positions
        # see different taps, only that much stays shared by them
        shared = float((taps * taps).sum() / taps.sum())
        cov = (w2 @ x.coherent(axis_in, c_in)) * (shared / n_y**2) if x.pos is not None else None
        out = with_spread(Stats.per_channel(axis_out, mean, (w2 @ var_in) / n_y + m2_mean, cov, pos))
        out.prof = prof_out
        gain = channels.Split(fluct, channels.Mat(w2, axis=axis_in, scale=shared / n_x**2), fluct)
        return Effect([out], [(ref.name, 0, 0, wrap(gain))])
    wsum = _block_diag([_tap_weighted(b, taps, 1) for b in blocks])
    wsum2 = wsum * wsum
    power_y = _block_diag([_partial_sum_power(b, mask_y, cnt_y, 1) for b in blocks])
    power_x = _block_diag([_partial_sum_power(b, mask_x, cnt_x, 1) for b in blocks])
    cov = None
    if x.pos is not None:
        cov_in = x.coherent(axis_in, c_in)
        cov = (wsum2 @ cov_in) / n_y**2
        var = (w2 @ (var_in - cov_in) + power_y @ cov_in) / n_y
    else:
        var = (w2 @ var_in) / n_y
    out = with_spread(Stats.per_channel(axis_out, mean, var + m2_mean, cov, pos))
    out.prof = prof_out
    gain = channels.Split(fluct, channels.Mat(wsum2, axis=axis_in, scale=1.0 / n_x**2), channels.Mat(power_x, axis=axis_in, scale=1.0 / n_x))
    return Effect([out], [(ref.name, 0, 0, wrap(gain))])


@handles("embedding")
def embedding(ctx: Ctx) -> Effect:
    """Lookup of rows of W: each output feature c has the statistics of column W[:, c]
    (ids uniform over the table)."""
    weight = ctx.param("weight") if ctx.node.kind == "call_module" else ctx.const(ctx.arg(1, "weight"))
    if weight is None:
        raise Unhandled("embedding with a computed table")
    w = weight.detach().double()
    nd = len(ctx.out_meta.shape)
    pos = (1,) if nd >= 3 else None  # tokens of a (batch, tokens, features) lookup: independent ids
    return Effect([Stats.per_channel(nd - 1, w.mean(0), w.pow(2).mean(0), torch.zeros(w.shape[1], dtype=torch.float64), pos)], [])


# --------------------------------------------------------------------------- norms
def _affine(weight, bias, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = weight.detach().double().reshape(-1) if weight is not None else torch.ones(n, dtype=torch.float64)
    b = bias.detach().double().reshape(-1) if bias is not None else torch.zeros(n, dtype=torch.float64)
    if g.numel() != n:
        g = torch.full((n,), float(g.pow(2).mean().sqrt()), dtype=torch.float64)
    if b.numel() != n:
        b = torch.full((n,), float(b.mean()), dtype=torch.float64)
    return g, b


def _normalized(ref: Ref, axis: int, gamma, beta, xhat_mean, xhat_m2, inv_var, tri, cov=None, pos=None, prof=None, excess=None) -> Effect:
    """y = gamma * x_hat + beta per channel, and its backward.

    Backward (Ioffe & Szegedy 2015): dL/dx = gamma / sigma * P(dL/dy), where P projects
    out the directions the statistics were computed along (the group mean and x_hat;
    RMSNorm: x_hat only). ``inv_var`` = E[1 / (sigma^2 + eps)] over the distribution of
    the sample variance (:func:`_sample_variance`); ``tri`` is P's action on the
    gradient's moments (:func:`_projection`):

        (g, s, x)_in = gamma^2 E[1 / (sigma^2 + eps)] tri @ (g, s, x)_out
    """
    mean = gamma * xhat_mean + beta
    m2 = gamma * gamma * xhat_m2 + 2 * gamma * beta * xhat_mean + beta * beta
    out = Stats.per_channel(axis, mean, m2, None if cov is None else gamma * gamma * cov, pos)
    out.prof = prof  # every position is divided by the same sigma
    gains = [] if tri is None else [(ref.name, 0, 0, channels.Tri(tri, gamma * gamma * inv_var, axis=axis, excess=excess))]
    return Effect([out], gains)


def _sample_variance(parts: list[tuple[Any, float]], eps: float) -> tuple[Any, Any]:
    """E[s^2] and E[1 / (s^2 + eps)] of a sample variance that is a sum of independent
    scaled chi-squares: ``parts`` = [(E[part], degrees of freedom)]. Satterthwaite's
    approximation (1946) gives s^2 ~ E[s^2] chi^2_nu / nu with nu = E[s^2]^2 /
    sum_i E[part_i]^2 / nu_i, and :func:`moments.inverse_moment` the mean of its inverse.

    For n independent values this is nu = n - 1 and E[1 / s^2] = n / ((n - 3) Var): a
    normalization over a small group (BatchNorm over 2x2 maps of 2 samples: n = 8)
    divides by a noisy variance, and its backward gain is 1.6x the 1 / Var of its mean."""
    total = sum(e for e, _ in parts)
    denom = sum(e * e / torch.as_tensor(nu, dtype=torch.float64).clamp_min(1e-9) for e, nu in parts)
    total_t = torch.as_tensor(total, dtype=torch.float64).clamp_min(1e-300)
    nu = total_t * total_t / torch.as_tensor(denom, dtype=torch.float64).clamp_min(1e-300)
    inv = inverse_moment(nu, eps / total_t) / total_t
    return total_t, inv


def _projection(n: float, p: float, rho_s, rho_x, centred: bool = True) -> torch.Tensor:
    """How removing the group mean and the x_hat direction acts on a gradient's moments.

    A group of n values holds n / p samples of p positions each (p = 1 for a group of
    unrelated values). Its gradient has E[g^2] = g, E[g_i g_j] = s in one sample and x
    across samples; x_hat has within- and cross-sample correlations rho_s, rho_x. The
    group mean m and c = mean(g x_hat) have (exchangeable values)

        E[m^2] = g / n + (p - 1) s / n + (n - p) x / n
        E[c^2] = g / n + (p - 1) rho_s s / n + (n - p) rho_x x / n

    and P g = g - m - x_hat c (1 and x_hat are orthogonal: x_hat is centred), so

        g' = g - E[m^2] - E[c^2],   s' = s - E[m^2] - rho_s E[c^2],   x' = x - E[m^2] - rho_x E[c^2].

    Independent values (s = x = 0) keep (n - 2) / n (the usual factor); a gradient shared
    by all p positions of a sample (after global pooling) loses its batch mean: half of
    it for 2 samples; one that a previous normalization already centred (x = -E[m^2])
    loses nothing more. ``rho_s``, ``rho_x`` may be per-channel vectors. Without
    centring (RMSNorm) only the x_hat direction goes."""
    rho_s = torch.as_tensor(rho_s, dtype=torch.float64)
    rho_x = torch.as_tensor(rho_x, dtype=torch.float64)
    rho_s, rho_x = torch.broadcast_tensors(rho_s, rho_x)
    one = torch.ones_like(rho_s)
    mc = torch.stack([one / n, one * (p - 1) / n, one * (n - p) / n], -1) if centred else torch.zeros(*rho_s.shape, 3, dtype=torch.float64)
    cc = torch.stack([one / n, rho_s * (p - 1) / n, rho_x * (n - p) / n], -1)
    eye = torch.eye(3, dtype=torch.float64).expand(*rho_s.shape, 3, 3)
    rows = torch.stack([mc + cc, mc + rho_s.unsqueeze(-1) * cc, mc + rho_x.unsqueeze(-1) * cc], -2)
    return (eye - rows).clamp_min(-1.0)


def _eps(value: Any, default: float = 1e-5) -> float:
    return float(default if value is None else value)


@handles("batch_norm")
def batch_norm(ctx: Ctx) -> Effect:
    """BatchNorm in training mode: each channel normalised over batch and positions.

    A channel's n values are b samples of p positions: x = mu + a_sample + e with
    Var(a) = s (the coherent part) and Var(e) = f = v - s. The batch variance is
    within-sample f chi^2_{b(p-1)} / n plus between-sample (s + f/p) chi^2_{b-1} / b,
    so E[s^2] = f (p - 1)/p + (s + f/p)(b - 1)/b (:func:`_sample_variance`); the batch
    mean has variance V = (s + f/p) / b, and x_hat's correlations are rho_s = (s - V) /
    E[s^2] within a sample and rho_x = -V / E[s^2] across samples. The backward is
    :func:`_normalized` with :func:`_projection`. With s = 0 and n large this is the
    classic gamma^2 / Var (n - 2) / n.
    """
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps", 1e-5)
    else:
        weight, bias = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias"))
        eps = ctx.arg(7, "eps", 1e-5)
    eps = _eps(eps)
    x = ctx.stat(ref)
    axis = 1 if len(meta.shape) > 1 else 0
    c = meta.shape[axis]
    n = meta.numel / c
    pos = tuple(range(2, len(meta.shape))) or None
    p = float(_positions(meta, pos)) if pos is not None and x.pos == pos else 1.0
    b = n / p
    _, var = x.channels(axis, c)
    s = x.coherent(axis, c).maximum(-var / (p - 1)).minimum(var) if p > 1 else torch.zeros_like(var)
    f = var - s
    between = s + f / p
    e_s2, inv = _sample_variance([(f * (p - 1) / p, b * (p - 1)), (between * (b - 1) / b, b - 1)], eps)
    v_mean = between / b
    rho_s = (s - v_mean) / e_s2
    rho_x = -v_mean / e_s2
    gamma, beta = _affine(weight, bias, c)
    zero = torch.zeros(c, dtype=torch.float64)
    out_pos = pos if p > 1 else (pos if pos is not None else None)
    cov = (s - v_mean) / (e_s2 + eps) if out_pos is not None else None
    tri = _projection(n, p, rho_s, rho_x)
    # a ReLU after the norm makes the gradient follow x_hat (its mask): with a gradient
    # shared by positions, mean(g x_hat) no longer averages out
    excess = (n, p, (gamma * gamma).clamp_min(1e-12), rho_s, rho_x)
    return _normalized(ref, axis, gamma, beta, zero, e_s2 / (e_s2 + eps), inv, tri, cov, out_pos, x.prof if x.pos == out_pos else None, excess)


@handles("layer_norm", "rms_norm")
def layer_norm(ctx: Ctx) -> Effect:
    """LayerNorm (Ba et al. 2016) / RMSNorm (Zhang & Sennrich 2019) over the last dims.

    Per sample the statistics run over the n features, so feature c of x_hat has mean
    (mu_c - mu) / sigma and second moment (v_c + (mu_c - mu)^2) / sigma^2, with mu and
    sigma^2 the averages over features (RMSNorm: x_hat_c = x_c / rms, rms^2 = E[x^2]).
    The per-token sigma^2 is a sum of n independent terms, feature c contributing
    v_c chi^2_1 shifted by (mu_c - mu)^2 (non-central: variance 2 v_c^2 + 4 v_c (mu_c -
    mu)^2), so :func:`_sample_variance` gives E[1 / (sigma^2 + eps)] -- unless the rows'
    mean square is known to vary less (``Stats.row_var``: the input is a LayerNorm's
    output plus a residual branch, Post-LN), then its own variance sets the degrees of
    freedom. The backward projects out the token's mean and x_hat
    (:class:`channels.RowNorm`), except what a LayerNorm downstream already removed;
    the parts of x and of the gradient shared by all positions pass scaled like the rest.
    """
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    rms = ctx.node.op == "rms_norm"
    if ctx.node.kind == "call_module":
        shape = ctx.attr("normalized_shape")
        weight, bias = ctx.param("weight"), ctx.param("bias")
        eps = ctx.attr("eps", 1e-5)
    elif rms:
        shape, weight, bias, eps = ctx.arg(1, "normalized_shape"), ctx.const(ctx.arg(2, "weight")), None, ctx.arg(3, "eps")
    else:
        shape = ctx.arg(1, "normalized_shape")
        weight, bias = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias"))
        eps = ctx.arg(4, "eps", 1e-5)
    eps = _eps(eps, torch.finfo(torch.float32).eps)
    n = math.prod(_tuple(shape, 1))
    x = ctx.stat(ref)
    axis = len(meta.shape) - 1
    c = meta.shape[axis]
    mean_c, var_c = x.channels(axis, c)
    cov_c = x.coherent(axis, c) if x.pos is not None else None
    if n != c:  # normalised over several dims: no per-feature detail
        mean_c = torch.full((c,), x.mean, dtype=torch.float64)
        var_c = torch.full((c,), x.var, dtype=torch.float64)
        cov_c = torch.full((c,), x.scalar().cov, dtype=torch.float64) if x.pos is not None else None
    gamma, beta = _affine(weight, bias, c)
    d = mean_c if rms else mean_c - mean_c.mean()
    e_s2 = float((var_c + d * d).sum() / n)
    if x.row_var is not None and n == c:  # the rows' mean square is known (a LayerNorm upstream)
        spread = x.row_var + (0.0 if rms else 2 * float(var_c.sum() / n**2) ** 2)
        dof = 2 * e_s2 * e_s2 / spread if spread > 0 else math.inf
    else:
        dof = _dof(var_c, d)
    _, inv = _sample_variance([(e_s2, dof)], eps)
    cov = cov_c / (e_s2 + eps) if cov_c is not None else None
    effect = _normalized(ref, axis, gamma, beta, d / math.sqrt(e_s2 + eps), (var_c + d * d) / (e_s2 + eps), None, None, cov, x.pos)
    g2, gb = gamma * gamma, gamma * beta
    # Var of the output rows' mean square: x_hat is on a sphere (sum x_hat^2 = n, and
    # sum x_hat = 0 unless RMS), so only gamma's and beta's spread make it random
    row_var = (2 * float((g2 * g2).sum()) - 2 * float(g2.sum()) ** 2 / n + 4 * float((gb * gb).sum()) - 4 * float(gb.sum()) ** 2 / n) / n**2
    effect.out[0].row_var = max(row_var, 0.0) if n == c else None
    gain = channels.RowNorm(gamma, float(inv), float(n), rms, float((beta * beta).mean()), axis=axis)
    effect.gains = [(ref.name, 0, 0, gain)]
    return effect


def _dof(var: torch.Tensor, shift: torch.Tensor) -> float:
    """Degrees of freedom of sum_c (x_c - shift_c)^2 over independent x_c ~ N(0, v_c)
    shifted by constants: E = sum (v + d^2), Var = sum (2 v^2 + 4 v d^2)."""
    e = float((var + shift * shift).sum())
    v = float((2 * var * var + 4 * var * shift * shift).sum())
    return e * e * 2 / v if v > 0 else math.inf


def _group_effect(ctx: Ctx, ref: Ref, groups: int, weight, bias, eps) -> Effect:
    """Per (sample, group of channels) normalisation: channel c in group G gets x_hat
    with mean (mu_c - mu_G)/sigma_G and second moment (v_c + (mu_c - mu_G)^2)/sigma_G^2.

    A group holds k channels of p positions; its sample variance is within-channel
    f_c chi^2_{p-1} / n plus the spread of the k channel averages (deterministic (mu_c -
    mu_G)^2 and random s_c + f_c / p); the group mean removes from each channel the
    part shared by its positions as BatchNorm removes the batch's (:func:`_projection`
    with the k channels in the role of samples: a coherent gradient or activation part is
    removed entirely by InstanceNorm, k = 1)."""
    eps = _eps(eps)
    meta = ctx.meta(ref)
    x = ctx.stat(ref)
    c = meta.shape[1]
    mean_c, var_c = x.channels(1, c)
    pos = tuple(range(2, len(meta.shape))) or None
    p = float(_positions(meta, pos)) if pos is not None else 1.0
    s_c = x.coherent(1, c).maximum(-var_c / max(p - 1, 1)).minimum(var_c) if (pos is not None and x.pos == pos) else torch.zeros(c, dtype=torch.float64)
    k = c // groups
    n = k * p
    mg, vg, sg = mean_c.reshape(groups, k), var_c.reshape(groups, k), s_c.reshape(groups, k)
    fg = vg - sg
    between = sg + fg / p
    dev = mg - mg.mean(1, keepdim=True)
    within = (fg * (p - 1) / p).sum(1) / k
    spread = (dev * dev + between).sum(1) / k * (k - 1) / k if k > 1 else torch.zeros(groups, dtype=torch.float64)
    nu_spread = _dof_rows(between, dev) * (k - 1) / max(k, 1)
    e_s2, inv = _sample_variance([(within, k * (p - 1)), (spread, nu_spread.clamp_min(1e-3))], eps)
    v_mean = between.sum(1, keepdim=True) / (k * k)  # variance of the group mean
    e_col = e_s2.unsqueeze(1)
    xm = (dev / (e_col + eps).sqrt()).reshape(-1)
    x2 = ((vg + dev * dev - v_mean) / (e_col + eps)).clamp_min(0.0).reshape(-1)
    rho_s = ((sg - v_mean) / e_col).reshape(-1)
    inv_c = inv.unsqueeze(1).expand(groups, k).reshape(-1)
    gamma, beta = _affine(weight, bias, c)
    cov = ((sg - v_mean) / (e_col + eps)).reshape(-1) if pos is not None else None
    tri = _projection(n, p, rho_s, torch.zeros_like(rho_s))
    # the group mean is taken per sample: a gradient part shared across samples stays
    tri[..., 2, :] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    return _normalized(ref, 1, gamma, beta, xm, x2, inv_c, tri, cov, pos, x.prof if x.pos == pos else None)


def _dof_rows(var: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`_dof` per row."""
    e = (var + shift * shift).sum(1)
    v = (2 * var * var + 4 * var * shift * shift).sum(1)
    return torch.where(v > 0, 2 * e * e / v.clamp_min(1e-300), torch.full_like(e, math.inf))


@handles("group_norm")
def group_norm(ctx: Ctx) -> Effect:
    """GroupNorm (Wu & He 2018): statistics over C/G channels and all positions."""
    ref = ctx.arg(0, "input")
    if ctx.node.kind == "call_module":
        groups, weight, bias, eps = ctx.attr("num_groups"), ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        groups = ctx.arg(1, "num_groups")
        weight, bias, eps = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias")), ctx.arg(4, "eps", 1e-5)
    return _group_effect(ctx, ref, groups, weight, bias, eps)


@handles("instance_norm")
def instance_norm(ctx: Ctx) -> Effect:
    """InstanceNorm (Ulyanov et al. 2016): statistics per sample and channel, i.e.
    GroupNorm with one channel per group."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        weight, bias, eps = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias")), ctx.arg(7, "eps", 1e-5)
    return _group_effect(ctx, ref, meta.shape[1], weight, bias, eps)


# --------------------------------------------------------------------------- dropout
@handles("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout")
def dropout(ctx: Ctx) -> Effect:
    """Inverted dropout in training mode: y = x * m / (1 - p), m ~ Bernoulli(1 - p).

    E[y] = E[x], E[y^2] = E[x^2] / (1 - p); the gradient is masked and scaled the same
    way, gain 1 / (1 - p). Channels keep their own statistics. Two positions have
    independent masks (E[m_i m_j] = (1 - p)^2): coherent parts pass unscaled. Channel
    dropout (``dropout2d``) draws one mask per sample and channel: E[m_i m_j] = 1 - p
    within a sample, so coherent parts scale by 1 / (1 - p) too.
    """
    p = ctx.attr("p") if ctx.node.kind == "call_module" else ctx.arg(1, "p", 0.5)
    training = ctx.arg(2, "training", True) if ctx.node.kind != "call_module" else ctx.attr("training", True)
    return _inverted_mask(ctx, p, training, shared="sample-channel" if ctx.node.op != "dropout" else None)


@handles("stochastic_depth", "drop_path")
def stochastic_depth(ctx: Ctx) -> Effect:
    """Stochastic depth / DropPath (Huang et al., ECCV 2016): in training mode a whole
    residual branch is dropped per sample (``mode="row"``) or per batch with probability
    p, the kept ones scaled by 1 / (1 - p). Per element that is inverted dropout's mask:
    E[y^2] = E[x^2] / (1 - p), gain 1 / (1 - p) (torchvision's
    ``stochastic_depth(input, p, mode, training)``; timm's ``drop_path(x, drop_prob,
    training, scale_by_keep)``). A sampled estimate would instead drop or keep the whole
    batch at once and read as 0 or 1. One mask per sample is shared by its positions:
    coherent parts scale like the rest.
    """
    if ctx.node.kind == "call_module":
        p, training = ctx.attr("p", ctx.attr("drop_prob", 0.0)), ctx.attr("training", True)
    elif ctx.node.op == "stochastic_depth":
        p, training = ctx.arg(1, "p", 0.0), ctx.arg(3, "training", True)
    else:
        p, training = ctx.arg(1, "drop_prob", 0.0), ctx.arg(2, "training", False)
    return _inverted_mask(ctx, float(p), bool(training), shared="sample")


def _inverted_mask(ctx: Ctx, p: float, training: bool, shared: str | None = None) -> Effect:
    """y = x m / (1 - p). ``shared``: one mask per sample and channel, or per sample,
    instead of one per element."""
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    if not training or p == 0:
        return Effect([_keep(x)], [(ref.name, 0, 0, channels.Diag(1.0))])
    if p >= 1:
        return Effect([_stats(0.0, 0.0)], [(ref.name, 0, 0, 0.0)])
    scale = 1.0 / (1 - p)
    k_s = scale if shared else 1.0
    if x.has_channels:
        mu = x.ch_mean
        cov = (mu * mu + x.coherent(x.axis, mu.numel())) * k_s - mu * mu if x.pos is not None else None
        out = Stats.per_channel(x.axis, x.ch_mean, x.ch_m2 * scale, cov, x.pos)
    else:
        out = _stats(x.mean, x.m2 * scale, x.pos, (x.mean**2 + x.cov) * k_s - x.mean**2)
    if x.row_var is not None and x.has_channels and shared != "sample":
        # each channel's own mask adds (p / (1 - p)^3) E[x^4] / n^2 to the rows' mean square
        var = (x.ch_m2 - x.ch_mean**2).clamp_min(0.0)
        x4 = 3 * var * var + 6 * var * x.ch_mean**2 + x.ch_mean**4
        out.row_var = x.row_var * scale * scale + p * scale**3 * float(x4.sum()) / x.ch_mean.numel() ** 2
    elif x.row_var is not None:  # one mask u = m / (1 - p)^2 for the whole row: Var(ms u)
        out.row_var = (x.row_var + x.m2 * x.m2) * scale**3 - (x.m2 * scale) ** 2
    out.prof = x.prof
    tri = torch.diag(torch.tensor([scale, k_s, 1.0], dtype=torch.float64))
    return Effect([out], [(ref.name, 0, 0, channels.Tri(tri))])


# --------------------------------------------------------------------------- pooling
_SAMPLER_SEED = 20240521


@lru_cache(maxsize=256)
def _max_of_normals(k: int) -> tuple[float, float]:
    """E[M] and E[M^2] for M the maximum of k iid N(0, 1) (density k phi(z) Phi(z)^(k-1)).
    For N(mu, s^2): E[max] = mu + s E[M], E[max^2] = mu^2 + 2 mu s E[M] + s^2 E[M^2]."""
    z, _ = gaussian_points(0.0, 1.0)
    w = max_of_k_weights(k, channels=False)
    return float((w * z).sum()), float((w * z * z).sum())


def _window(ctx: Ctx, ref: Ref) -> float:
    """Number of input elements per output element of a pooling op."""
    node = ctx.node
    x_meta = ctx.meta(ref)
    y_meta = ctx.out_meta
    if node.op.startswith("adaptive"):
        return max(x_meta.numel / y_meta.numel, 1.0)
    nd = len(x_meta.shape) - 2 if len(x_meta.shape) > 2 else 1
    ks = ctx.attr("kernel_size") if node.kind == "call_module" else ctx.arg(1, "kernel_size")
    return float(math.prod(_tuple(ks, nd)))


def _pool_channels(ctx: Ctx, ref: Ref) -> tuple[Stats, torch.Tensor, torch.Tensor, torch.Tensor, int, tuple | None]:
    """(stats, mean, var, coherent covariance per channel, channel axis, output position
    axes) of a pooling op's input (channels on axis 1, positions after it)."""
    meta = ctx.meta(ref)
    axis = 1 if len(meta.shape) > 2 else 0
    x = ctx.stat(ref)
    mean, var = x.channels(axis, meta.shape[axis])
    spatial = tuple(range(axis + 1, len(meta.shape)))
    cov = x.coherent(axis, meta.shape[axis]).maximum(-var).minimum(var) if x.pos == spatial else torch.zeros_like(var)
    out_pos = tuple(a for a in spatial if ctx.out_meta.shape[a] > 1) or None
    return x, mean, var, cov, axis, out_pos


def _pooled_gradient(r: float, k: float, p_in: int) -> torch.Tensor:
    """(g, s, x) map of a pooling backward: each input is in r k windows and receives
    dL/dy / k from each (r = numel(out) / numel(in); r k = 1 without overlap). Windows'
    gradients share s, so E[g_in^2] = (r/k) g + (r^2 - r/k) s. Two positions share a
    window with probability q = (k - 1) / (p_in - 1), else they see different windows:
    E[g_i g_j] = q E[g_in^2] + (1 - q) r^2 s. Across samples, r^2 x. A global average
    (k = p_in) makes the gradient identical at every position: s_in = g_in."""
    q = min(max((k - 1) / (p_in - 1), 0.0), 1.0) if p_in > 1 else 1.0
    g_row = [r / k, r * r - r / k, 0.0]
    s_row = [q * g_row[0], q * g_row[1] + (1 - q) * r * r, 0.0]
    return torch.tensor([g_row, s_row, [0.0, 0.0, r * r]], dtype=torch.float64)


@handles("max_pool", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d")
def max_pool(ctx: Ctx) -> Effect:
    """Max over windows of k elements, per channel.

    Forward: when the input is a monotone function f of a Gaussian value (ReLU, ...
    after a conv or norm), max f(z_i) = f(max z_i) is integrated exactly under the
    density of the maximum of k Gaussians, k phi(z) Phi(z)^(k-1); otherwise the k
    inputs are treated as Gaussians with the input's moments. A part shared by all
    positions (variance s) shifts the whole window: max(a + e_i) = a + max e_i.

    Backward: each window routes its gradient to its arg-max, so the summed squared
    gradient is preserved: gain = numel(out) / numel(in) -- but only arg-max elements
    receive it, which the engine accounts for upstream (:class:`channels.AtMax`). An
    input is an arg-max with probability r = numel(out) / numel(in), two inputs with
    probability r^2: a coherent gradient part keeps r of its power and r^2 of its
    covariance.
    """
    ref = ctx.first_ref()
    x, mean, var, cov, axis, pos = _pool_channels(ctx, ref)
    k = max(int(round(_window(ctx, ref))), 1)
    exact = ctx.engine.fused_max_moments(ref.name, k)
    if exact is not None:
        out = Stats.per_channel(axis, *exact, cov, pos) if exact[0].dim() else _stats(float(exact[0]), float(exact[1]), pos, float(cov.mean()))
    else:
        em, em2 = _max_of_normals(k)
        sd = (var - cov).sqrt()
        m = mean + sd * em
        out = Stats.per_channel(axis, m, m * m + cov + (var - cov) * (em2 - em * em), cov, pos)
    out.row_spread = rows.kept_if_equal(x, axis)
    r = _ratio(ctx.out_meta, ctx.meta(ref))
    at_max = channels.AtMax(r, k, axis=axis)
    return Effect([out], [(ref.name, 0, 0, channels.Split(at_max, channels.Diag(r * r, axis=axis), at_max))])


@handles("avg_pool", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
def avg_pool(ctx: Ctx) -> Effect:
    """Mean over windows of k elements. With a part shared by all positions (variance
    s_c) and the rest independent, E[y_c^2] = mu_c^2 + s_c + (v_c - s_c) / k: a coherent
    part is not averaged away (random-effects model).

    Backward: every input receives dL/dy / k from each window it belongs to:
    gain = numel(out) / (k numel(in)) for independent gradients; coherent parts by
    :func:`_pooled_gradient`. Every channel of a position gets its share from the same
    windows, so a gradient whose rows sum to zero keeps doing so
    (:mod:`gradaudit.propagation.rows`).
    """
    ref = ctx.first_ref()
    x, mean, var, cov, axis, pos = _pool_channels(ctx, ref)
    k = _window(ctx, ref)
    in_meta = ctx.meta(ref)
    p_in = in_meta.numel // (in_meta.shape[0] * in_meta.shape[axis]) if len(in_meta.shape) > 2 else 1
    out = Stats.per_channel(axis, mean, mean * mean + cov + (var - cov) / k, cov if pos is not None else None, pos)
    out.row_spread = rows.kept_if_equal(x, axis)
    tri = _pooled_gradient(_ratio(ctx.out_meta, in_meta), k, p_in)
    return Effect([out], [(ref.name, 0, 0, channels.Tri(tri, axis=axis, rows_kept=True))])


# --------------------------------------------------------------------------- reductions
def _reduction(ctx: Ctx, ref: Ref) -> tuple[float, int | None, str, tuple | None]:
    """Elements per output element, where the input's channel axis ends up, what was
    reduced (``positions``, ``channels`` or ``other``) and the output's position axes."""
    meta = ctx.meta(ref)
    n = meta.numel / max(ctx.out_meta.numel, 1)
    x = ctx.stat(ref)
    nd = len(meta.shape)
    dims = ctx.arg(1, "dim", None)
    if dims is None:
        return n, None, "other", None
    dims = [channels.normalize_axis(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    keepdim = bool(ctx.arg(2, "keepdim", False))
    moved = (lambda a: a) if keepdim else (lambda a: a - sum(1 for d in dims if d < a))
    pos = None
    if x.pos is not None:
        pos = tuple(moved(a) for a in x.pos if a not in dims and ctx.out_meta.shape[moved(a)] > 1) or None
    kind = "other"
    if x.pos is not None and all(d in x.pos for d in dims):
        kind = "positions"
    elif x.has_channels and dims == [x.axis]:
        kind = "channels"
    if not x.has_channels or x.axis in dims:
        return n, None, kind, pos
    return n, moved(x.axis), kind, pos


def _reduced(ctx: Ctx, ref: Ref, total: bool) -> Effect:
    """Mean (``total`` False) or sum of n elements, per channel where tracked.

    Over positions: y = a + mean(e) keeps the coherent part whole, E[y^2] = mu^2 + s +
    (v - s)/n; the backward gives every position of a sample the same gradient
    (:func:`_pooled_gradient` with k = n). Over the channel axis: independent channels,
    Var[y] = mean_c v_c / n with the deterministic spread of the channel means left out,
    and y keeps mean_c s_c / n of coherence. A sum is n times the mean (gain times n^2).
    """
    n, axis, kind, pos = _reduction(ctx, ref)
    x = ctx.stat(ref)
    scale = n if total else 1.0
    in_meta = ctx.meta(ref)
    if axis is not None:
        mu, var = x.channels(x.axis, x.ch_mean.numel())
        cov = x.coherent(x.axis, mu.numel()).maximum(-var).minimum(var) if x.pos is not None else torch.zeros_like(var)
        if kind == "positions":
            p_in = _positions(in_meta, x.pos)
            out_cov = cov if pos is not None else None
            out = Stats.per_channel(axis, scale * mu, scale * scale * (mu * mu + cov + (var - cov) / n), None if out_cov is None else scale * scale * out_cov, pos)
            out.positive = x.positive
            return Effect([out], [(ref.name, 0, 0, channels.Tri(_pooled_gradient(1.0 / n, n, p_in) * scale * scale))])
        out = Stats.per_channel(axis, scale * mu, scale * scale * (mu * mu + var / n))
        out.positive = x.positive
        return Effect([out], [(ref.name, 0, 0, channels.Diag(scale * scale / n**2))])
    base = x.scalar() if x.has_channels else x
    if kind == "channels":
        _, var = x.channels(x.axis, x.ch_mean.numel())
        v = float(var.mean())
        cov = float(x.coherent(x.axis, var.numel()).mean()) / n if x.pos is not None else 0.0
        out = _stats(scale * x.mean, scale * scale * (x.mean**2 + v / n), pos, scale * scale * cov)
    elif kind == "positions":
        cov = min(max(base.cov, -base.var), base.var)
        out = _stats(scale * x.mean, scale * scale * (x.mean**2 + cov + (base.var - cov) / n), pos, scale * scale * cov)
        out.positive = x.positive
        return Effect([out], [(ref.name, 0, 0, channels.Tri(_pooled_gradient(1.0 / n, n, _positions(in_meta, x.pos)) * scale * scale))])
    else:
        out = _stats(scale * x.mean, scale * scale * (x.mean**2 + x.var / n))
    out.positive = x.positive
    return Effect([out], [(ref.name, 0, 0, scale * scale / n**2)])


@handles("mean")
def mean(ctx: Ctx) -> Effect:
    """Mean of n elements (see :func:`_reduced`); gain 1/n^2 for independent gradients."""
    return _reduced(ctx, ctx.first_ref(), total=False)


@handles("sum")
def sum_(ctx: Ctx) -> Effect:
    """Sum of n elements (see :func:`_reduced`): E[y^2] = n v + n^2 mu^2 for independent
    elements; gain 1."""
    return _reduced(ctx, ctx.first_ref(), total=True)


# --------------------------------------------------------------------------- arithmetic
def _numel_gain(ctx: Ctx, ref: Ref) -> float:
    """Broadcast inputs collect the gradients of all their copies."""
    return _ratio(ctx.out_meta, ctx.meta(ref))


@dataclass
class _Operand:
    """One input of an elementwise binary op, as vectors over the output's channels (a
    single entry when the output tracks none), seen in the output's layout.

    ``cov``: its covariance between two positions of one sample in the output (its
    variance where it is broadcast over the positions); ``cross``: E[x_i x_j] for two
    samples (its squared mean, or its square when it is a constant); ``r``: copies of
    each element in the output; ``coherent_copies``: the copies lie along positions."""

    ref: Ref | None
    mean: torch.Tensor
    m2: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor
    r: float = 1.0
    coherent_copies: bool = False
    channelled: bool = False

    @property
    def pair(self) -> torch.Tensor:
        """E[x_i x_j] for two positions of one sample."""
        return self.mean * self.mean + self.cov


def _broadcast_axes(in_shape: tuple, out_shape: tuple) -> list[int]:
    nd = len(out_shape)
    shape = (1,) * (nd - len(in_shape)) + tuple(in_shape)
    return [k for k in range(nd) if shape[k] == 1 and out_shape[k] > 1]


def _operands(ctx: Ctx, items: list[Any]) -> tuple[list[_Operand], int | None, tuple | None]:
    """Both inputs of a binary op on a shared channel axis of the output (or as single
    entries), with the output's channel axis and position axes."""
    out_shape = ctx.out_meta.shape
    stats = [ctx.stat(op) if isinstance(op, Ref) and ctx.const(op) is None else None for op in items]
    full = [(s, op) for s, op in zip(stats, items) if s is not None and ctx.meta(op).shape == out_shape]
    lead = next((s for s, _ in full if s.has_channels), None)
    axis = lead.axis if lead is not None else None
    c = out_shape[axis] if axis is not None else 1
    pos = next((s.pos for s, _ in full if s.pos is not None), None)
    p_out = _positions(ctx.out_meta, pos)
    out = []
    for op, s in zip(items, stats):
        if isinstance(op, (int, float, bool)):
            v = torch.full((c,), float(op), dtype=torch.float64)
            out.append(_Operand(None, v, v * v, torch.zeros_like(v), v * v))
            continue
        if not isinstance(op, Ref):
            raise Unhandled(f"operand {op!r}")
        const = ctx.const(op)
        if const is not None:
            v = channels.broadcast_channel_vector(const, out_shape, axis) if axis is not None else None
            if v is None:  # a constant tensor without channel structure: its own moments
                cd = const.detach().double()
                v_mean, v_m2 = float(cd.mean()), float(cd.pow(2).mean())
                mean_v, m2_v = torch.full((c,), v_mean, dtype=torch.float64), torch.full((c,), v_m2, dtype=torch.float64)
                out.append(_Operand(op, mean_v, m2_v, torch.zeros_like(mean_v), m2_v, _ratio(ctx.out_meta, ctx.meta(op))))
            else:
                out.append(_Operand(op, v, v * v, torch.zeros_like(v), v * v, _ratio(ctx.out_meta, ctx.meta(op)), channelled=True))
            continue
        meta = ctx.meta(op)
        r = _ratio(ctx.out_meta, meta)
        nd_shift = len(out_shape) - len(meta.shape)
        channelled = s.has_channels and axis is not None and s.axis + nd_shift == axis and s.ch_mean.numel() == c
        if channelled:
            mean_v, var_v = s.ch_mean, (s.ch_m2 - s.ch_mean**2).clamp_min(0.0)
            cov_v = s.coherent(s.axis, c) if s.pos is not None else torch.zeros(c, dtype=torch.float64)
        else:
            base = s.scalar() if s.has_channels else s
            mean_v = torch.full((c,), base.mean, dtype=torch.float64)
            var_v = torch.full((c,), base.var, dtype=torch.float64)
            cov_v = torch.full((c,), base.cov if base.pos is not None else 0.0, dtype=torch.float64)
        grown = _broadcast_axes(meta.shape, out_shape)
        copies = bool(grown) and pos is not None and all(k in pos for k in grown)
        if copies:  # copies along positions: coherent over them
            q = (r - 1) / (p_out - 1) if p_out > 1 else 1.0
            cov_v = cov_v + min(q, 1.0) * (var_v - cov_v)
        elif s.pos is None or (meta.shape == out_shape and s.pos != pos):
            cov_v = torch.zeros_like(cov_v)
        out.append(_Operand(op, mean_v, var_v + mean_v**2, cov_v.maximum(-var_v).minimum(var_v), mean_v**2, r, copies, channelled))
    return out, axis, pos


def _binary_result(axis: int | None, pos: tuple | None, mean, m2, cov) -> Stats:
    if axis is not None:
        return Stats.per_channel(axis, mean, m2, cov if pos is not None else None, pos)
    return _stats(float(mean), float(m2), pos, float(cov))


def _wrap(gain_vec: torch.Tensor, o: _Operand, tri: torch.Tensor | None = None) -> Any:
    """A per-channel gain as the operand can take it: a vector (Diag / Tri) when it
    shares the output's channels, else its scalar average."""
    if tri is not None:
        if o.channelled:
            return channels.Tri(tri)
        return channels.Tri(tri.mean(0) if tri.dim() == 3 else tri)
    if o.channelled:
        return channels.Diag(gain_vec)
    return float(gain_vec.mean())


def _summed_copies(o: _Operand, g_fac: torch.Tensor, s_fac: torch.Tensor, x_fac: torch.Tensor) -> Any:
    """Gain into an operand whose value y = o * h meets dL/dy: per element E[h^2] g,
    E[h_i h_j] s, E[h_i h_j'] x (``*_fac``). An operand copied r times along positions
    (a per-sample gate broadcast over an image) collects the sum of its copies:
    E[(sum_p h_p g_p)^2] = r E[h^2] g + r (r - 1) E[h_p h_p'] s, and r^2 E[h h'] x across
    samples; other broadcasts add r independent copies."""
    if o.coherent_copies:
        r = o.r
        zero = torch.zeros_like(g_fac)
        rows = torch.stack(
            [
                torch.stack([r * g_fac, r * (r - 1) * s_fac, zero], -1),
                torch.stack([zero, r * r * s_fac, zero], -1),
                torch.stack([zero, zero, r * r * x_fac], -1),
            ],
            -2,
        )
        return _wrap(g_fac, o, rows)
    if bool(torch.equal(g_fac, s_fac)) and bool(torch.equal(g_fac, x_fac)):
        return _wrap(g_fac * o.r, o)
    zero = torch.zeros_like(g_fac)
    rows = torch.stack(
        [torch.stack([g_fac, zero, zero], -1), torch.stack([zero, s_fac, zero], -1), torch.stack([zero, zero, x_fac], -1)], -2
    ) * o.r
    return _wrap(g_fac, o, rows)


@handles("add", "sub", "rsub")
def add(ctx: Ctx) -> Effect:
    """Sum of independent values (a residual connection): E[(a+b)^2] = E[a^2] + E[b^2]
    + 2 E[a] E[b], per channel; the coherent covariances add too. Each input receives
    the full gradient (times its broadcast count; copies along positions add coherently,
    see :func:`_summed_copies`). ``alpha`` scales b."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    alpha = float(ctx.node.kwargs.get("alpha", 1.0))
    c = -alpha if ctx.node.op in ("sub", "rsub") else alpha
    if ctx.node.op == "rsub":  # rsub(x, y) = y - alpha * x
        a, b = b, a
    (oa, ob), axis, pos = _operands(ctx, [a, b])
    mean = oa.mean + c * ob.mean
    m2 = oa.m2 + c * c * ob.m2 + 2 * c * oa.mean * ob.mean
    out = _binary_result(axis, pos, mean, m2, oa.cov + c * c * ob.cov)
    out.prof = _sum_profile(ctx, pos, [(a, oa, 1.0), (b, ob, c * c)])
    rows = _rows(ctx, axis, [(oa, 1.0, a), (ob, c * c, b)])
    if rows is not None:
        out.row_var = rows[0]
    gains = []
    for k, (o, w) in enumerate(((oa, 1.0), (ob, c * c))):
        if o.ref is not None:
            one = torch.full_like(o.mean, w)
            gain = _summed_copies(o, one, one, one)
            if rows is not None:
                gain = channels.Aligned(gain, rows[1][k], w)
            gains.append((o.ref.name, 0, 0, gain))
    return Effect([out], gains)


def _sum_profile(ctx: Ctx, pos: tuple | None, parts: list) -> tuple | None:
    """The position profile of a sum: its parts' profiles weighted by their variances
    (:func:`channels.combine_profiles`); parts broadcast over positions are flat."""
    if pos is None:
        return None
    items = []
    for ref, o, w in parts:
        st = ctx.stat(ref) if isinstance(ref, Ref) and ctx.const(ref) is None else None
        prof = st.prof if st is not None and st.pos == pos and ctx.meta(ref).shape == ctx.out_meta.shape else None
        items.append((prof, w * float((o.m2 - o.mean * o.mean).mean())))
    return channels.combine_profiles(items)


def _row_spread(mean: torch.Tensor, m2: torch.Tensor) -> float:
    """A row's expected centred mean square: mean_c (v_c + (mu_c - mean mu)^2)."""
    var = (m2 - mean * mean).clamp_min(0.0)
    d = mean - mean.mean()
    return float((var + d * d).mean())


def _fresh_row_var(mean: torch.Tensor, m2: torch.Tensor) -> float:
    """Var of a row's mean square over independent Gaussian channels: sum_c (2 v_c^2 +
    4 v_c mu_c^2) / n^2."""
    var = (m2 - mean * mean).clamp_min(0.0)
    return float((2 * var * var + 4 * var * mean * mean).sum()) / mean.numel() ** 2


def _rows(ctx: Ctx, axis: int | None, parts: list) -> tuple[float, list[float]] | None:
    """For a sum of same-shape values along rows (channel axis last) of which one carries
    a known row variance (a LayerNorm's output on a residual stream): the sum's row
    variance, Var(ms(a + c b)) = Var(ms a) + c^4 Var(ms b) + 4 c^2 sum_c (E[a^2] E[b^2] -
    mu_a^2 mu_b^2) / n^2, and each operand's share of the sum's centred row variance."""
    out_shape = ctx.out_meta.shape
    if axis is None or axis != len(out_shape) - 1:
        return None
    stats = [ctx.stat(r) if isinstance(r, Ref) and ctx.const(r) is None else None for _, _, r in parts]
    if not any(s is not None and s.row_var is not None for s in stats):
        return None
    if not all(o.channelled and o.r == 1 for o, _, _ in parts):
        return None
    n = out_shape[axis]
    (oa, _, _), (ob, w, _) = parts
    rv = []
    for (o, k, _), s in zip(parts, stats):
        own = s.row_var if s is not None and s.row_var is not None else _fresh_row_var(o.mean, o.m2)
        rv.append(k * k * own)
    cross = 4 * w * float((oa.m2 * ob.m2 - oa.mean**2 * ob.mean**2).sum()) / n**2
    spread_a, spread_b = _row_spread(oa.mean, oa.m2), w * _row_spread(ob.mean, ob.m2)
    total = spread_a + spread_b
    shares = [spread_a / total, spread_b / total] if total > 0 else [0.5, 0.5]
    return sum(rv) + cross, shares


@handles("mul")
def mul(ctx: Ctx) -> Effect:
    """Product of independent values (gating, a per-channel scale): E[(ab)^2] =
    E[a^2] E[b^2] per channel, Cov((ab)_i, (ab)_j) = E[a_i a_j] E[b_i b_j] - (E[a] E[b])^2
    for two positions of a sample. dL/da = b dL/dy: gain(a) = E[b^2] on the gradient,
    E[b_i b_j] on its coherent part, E[b]^2 on the part shared across samples (b^2 for a
    constant b). A per-sample gate broadcast over an image (squeeze-and-excitation)
    collects sum_p a_p g_p: when g is shared by the positions (behind a global pool) and a
    has a mean, that is p^2 (mu_a^2 + s_a) times the coherent gradient, not p E[a^2]
    (:func:`_summed_copies`)."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    (oa, ob), axis, pos = _operands(ctx, [a, b])
    mean = oa.mean * ob.mean
    cov = oa.pair * ob.pair - mean * mean
    out = _binary_result(axis, pos, mean, oa.m2 * ob.m2, cov)
    gains = []
    for o, other in ((oa, ob), (ob, oa)):
        if o.ref is not None:
            gains.append((o.ref.name, 0, 0, _summed_copies(o, other.m2, other.pair, other.cross)))
    return Effect([out], gains)


def _contraction(a: Stats, b: Stats, k: float) -> Stats:
    """y = sum over k products of independent entries: E[y] = k mu_a mu_b,
    E[y^2] = k E[a^2] E[b^2] + k (k - 1) mu_a^2 mu_b^2."""
    return _stats(k * a.mean * b.mean, k * a.m2 * b.m2 + k * (k - 1) * a.mean**2 * b.mean**2)


@handles("matmul")
def matmul(ctx: Ctx) -> Effect:
    """a @ b with a (..., n, k) and b (..., k, m): a contraction over k.

    Forward: :func:`_contraction`; backward: :func:`_contraction_effect` (dL/da = dL/dy
    b^T sums m terms: gain(a) = m E[b^2] without broadcasting).
    """
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        raise Unhandled("matmul with a constant")
    ma, mb = ctx.meta(a), ctx.meta(b)
    if len(ma.shape) < 2 or len(mb.shape) < 2:
        raise Unhandled("matmul with a vector")
    k = ma.shape[-1]
    sa, sb = ctx.stat(a), ctx.stat(b)
    return _contraction_effect(ctx, a, b, sa, sb, k)


def _contraction_effect(ctx: Ctx, a: Ref, b: Ref, sa: Stats, sb: Stats, k: int) -> Effect:
    """Backward of a contraction: each of the numel(out) * k product terms involves one
    element of a and one of b; an element of a appears numel(out) k / numel(a) times, each
    time contributing b * dL/dy, so gain(a) = numel(out) k / numel(a) * E[b^2]."""
    terms = ctx.out_meta.numel * k
    ga = terms / ctx.meta(a).numel * sb.m2
    gb = terms / ctx.meta(b).numel * sa.m2
    return Effect([_contraction(sa, sb, k)], [(a.name, 0, 0, ga), (b.name, 0, 0, gb)])


@handles("einsum")
def einsum(ctx: Ctx) -> Effect:
    """Two-operand einsum as a contraction over the summed indices (see ``matmul``)."""
    eq = ctx.node.args[0]
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or len(operands) != 2 or not all(isinstance(o, Ref) for o in operands):
        raise Unhandled("einsum form")
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise Unhandled("implicit or ellipsis einsum")
    lhs, out = eq.split("->")
    sa_, sb_ = lhs.split(",")
    a, b = operands
    ma, mb = ctx.meta(a), ctx.meta(b)
    sizes = dict(zip(sa_, ma.shape)) | dict(zip(sb_, mb.shape))
    k = math.prod(sizes[c] for c in sizes if c not in out)
    return _contraction_effect(ctx, a, b, ctx.stat(a), ctx.stat(b), k)


# --------------------------------------------------------------------------- softmax & attention
def _softmax_sample(mean: float, var: float, n_keys: int, causal_rows: int = 0) -> dict[str, float]:
    """Moments of p = softmax(s) for logits s_j ~ N(mean, var) iid over n keys.

    Returned per row (averaged over rows, a causal mask giving row i only i+1 keys):
    ``p2`` = E[sum_j p_j^2] (forward: attention output E[o^2] = p2 * Var[v] + mu_v^2),
    ``p_mean``, ``p_m2`` = E[p_j], E[p_j^2] per entry, and ``jac`` = E[sum_i p_i^2 (1 -
    2 p_i + sum_j p_j^2)], the squared Frobenius norm of the softmax Jacobian
    diag(p) - p p^T, which turns the logit-gradient gain into sum over the row.
    Computed by sampling with a fixed seed (the expectations have no closed form).
    """
    return dict(_softmax_sample_cached(round(mean, 9), round(var, 9), n_keys, causal_rows))


@lru_cache(maxsize=512)
def _softmax_sample_cached(mean: float, var: float, n_keys: int, causal_rows: int) -> tuple:
    gen = torch.Generator().manual_seed(_SAMPLER_SEED)
    rows = max(4096 // max(n_keys, 1), 64) if not causal_rows else max(causal_rows, 1)
    reps = 1 if not causal_rows else max(2048 // max(rows * n_keys, 1), 4)
    s = mean + math.sqrt(max(var, 0.0)) * torch.randn(reps, rows, n_keys, generator=gen, dtype=torch.float64)
    if causal_rows:
        mask = torch.ones(rows, n_keys, dtype=torch.bool).tril(diagonal=n_keys - rows)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p2 = p.pow(2).sum(-1)
    jac = (p.pow(2) * (1 - 2 * p + p2.unsqueeze(-1))).sum(-1)
    return tuple(
        {
            "p2": float(p2.mean()),
            "p_mean": float(p.mean()),
            "p_m2": float(p.pow(2).mean()),
            "jac": float(jac.mean()),
        }.items()
    )


@handles("softmax", "softmin", "log_softmax")
def softmax(ctx: Ctx) -> Effect:
    """Softmax over a dimension of n independent logits (see :func:`_softmax_sample`).

    dL/ds_i = p_i (g_i - sum_j p_j g_j), so E[(dL/ds)^2] = g2 * jac / n per element.
    LogSoftmax: y = s - logsumexp(s); dL/ds = g - p sum g, gain 1 - 2 E[p] + E[sum p^2]
    and E[y^2] by the same sample.

    Over the channel axis of a row whose spread is tracked
    (:mod:`gradaudit.propagation.rows`), the logits are drawn with that spread instead:
    a part shared by the whole row changes nothing (n / (n - 1) turns the spread around
    the row's own mean back into the variance of n iid draws). The softmax's backward
    then sums to zero along the row (dm = E[g^2]); so does LogSoftmax's, g - p sum g,
    only when sum g = 0, which a cotangent independent of the values is not.
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    meta = ctx.meta(ref)
    dim = ctx.arg(1, "dim", None) if ctx.node.kind != "call_module" else ctx.attr("dim")
    if dim is None:
        dim = -1
    n = meta.shape[dim]
    mean, var = (x.mean, x.var) if ctx.node.op != "softmin" else (-x.mean, x.var)
    over_rows = x.axis is not None and x.axis == dim % len(meta.shape)
    spread = x.spread() if over_rows and n > 1 else None
    if spread is not None:
        mean, var = 0.0, spread * n / (n - 1)
    if ctx.node.op == "log_softmax":
        ls = _log_softmax_sample(round(mean, 9), round(var, 9), n)
        return Effect([_stats(ls[0], ls[1])], [(ref.name, 0, 0, ls[2])])
    st = _softmax_sample(mean, var, n)
    gain = st["jac"] / n
    return Effect([_stats(st["p_mean"], st["p_m2"])], [(ref.name, 0, 0, channels.RowSumZero(gain) if over_rows else gain)])


@lru_cache(maxsize=128)
def _log_softmax_sample(mean: float, var: float, n: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(_SAMPLER_SEED)
    rows = max(4096 // max(n, 1), 64)
    s = mean + math.sqrt(max(var, 0.0)) * torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y = torch.log_softmax(s, dim=-1)
    p = y.exp()
    gain = 1 - 2 * p.mean() + p.pow(2).sum(-1).mean()
    return float(y.mean()), float(y.pow(2).mean()), float(gain)


@dataclass
class _Heads:
    """Per-channel statistics of q, k, v along the head dimension (vectors over the
    model's channels, split into ``heads`` contiguous groups), with the coherent
    covariance of k and v along the token axis."""

    m2_q: torch.Tensor
    mean_v: torch.Tensor
    var_v: torch.Tensor
    cov_v: torch.Tensor
    fluct_k: torch.Tensor
    heads: int


def _token_coherence(s: Stats, axis: int | None, n: int, token_axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, var, coherent covariance along ``token_axis``) over n channels."""
    base = s if axis is not None else s.scalar()
    mean, var = base.channels(axis if axis is not None else 0, n)
    if s.pos is not None and token_axis in s.pos:
        cov = base.coherent(axis, n) if axis is not None else torch.full((n,), base.cov, dtype=torch.float64)
    else:
        cov = torch.zeros(n, dtype=torch.float64)
    return mean, var, cov.maximum(-var).minimum(var)


def attention_core(h: _Heads, scale: float, n_q: int, n_k: int, causal: bool, dropout_p: float = 0.0) -> dict[str, Any]:
    """Scaled dot-product attention softmax(s q k^T) v at initialisation (Vaswani 2017),
    per channel of the head dimension.

    Logits vary along a row (over keys t) only through k's part that differs between
    tokens: k_t = mu_k + a + e_t with a shared by the sample's tokens (variance s_k) and
    e its own (f_k = v_k - s_k); the shared part shifts a whole row, which softmax
    ignores. So the effective logit variance is s^2 sum_c E[q_c^2] f_k,c (per head).
    With P the attention matrix and p2 = E[sum_t P_st^2] (:func:`_softmax_sample`):

        o_s = mu_v + a_v + sum_t P_st e_t:   E[o^2] = mu_v^2 + s_v + p2 f_v
        Cov(o_s, o_s') = s_v + f_v / n_k     (two queries: rows independent, mean 1/n_k)

    Backward, with the output gradient's E[g^2] = g, same-sample covariance s, cross
    x, and E[P_st P_s't] = 1/n_k^2 for two rows, E[P_st P_st'] = (1 - p2) / (n_k (n_k - 1)):

        g_v = (n_q p2 / n_k) g + n_q (n_q - 1) / n_k^2 s
        s_v = n_q (1 - p2) / (n_k (n_k - 1)) g + n_q (n_q - 1) / n_k^2 s,   x_v = (n_q / n_k)^2 x

    so a gradient shared by the queries reaches v whole. dL/dP_st = g_s . v_t sees only
    v's token-specific part (the rest is constant along the row and the softmax
    Jacobian, whose rows sum to 0, removes it): E[dl^2] = jac / n_k sum_c g_c f_v,c per
    logit, and

        g_q,c' = s^2 jac f_k,c' sum_c g_c f_v,c,   g_k,c' = s^2 jac (n_q / n_k) E[q_c'^2] sum_c g_c f_v,c

    (per head; k's shared part drops out of dq because sum_t dl_st = 0). Dropout on P
    scales p2 and dL/dP by 1 / (1 - p).
    """
    keep = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    c = h.m2_q.numel()
    per = c // h.heads
    f_v = (h.var_v - h.cov_v).clamp_min(0.0)
    logit_var = scale**2 * float((h.m2_q * h.fluct_k).reshape(h.heads, per).sum(1).mean())
    st = _softmax_sample(0.0, logit_var, n_k, causal_rows=n_q if causal else 0)
    p2 = st["p2"] * keep
    out_m2 = h.mean_v**2 + h.cov_v + p2 * f_v
    out_cov = h.cov_v + f_v / n_k
    pair = n_q * (n_q - 1) / n_k**2
    tri_v = torch.tensor(
        [[n_q * p2 / n_k, pair, 0.0], [n_q * (1 - st["p2"]) / (n_k * max(n_k - 1, 1)), pair, 0.0], [0.0, 0.0, (n_q / n_k) ** 2]],
        dtype=torch.float64,
    )
    blocks_q, blocks_k = [], []
    for i in range(h.heads):
        sl = slice(i * per, (i + 1) * per)
        base = scale**2 * st["jac"] * keep
        blocks_q.append(base * torch.outer(f_v[sl], h.fluct_k[sl]))
        blocks_k.append(base * (n_q / n_k) * torch.outer(f_v[sl], h.m2_q[sl]))
    return {
        "logit_var": logit_var,
        "logit_std": math.sqrt(max(logit_var, 0.0)),
        "out_mean": h.mean_v,
        "out_m2": out_m2,
        "out_cov": out_cov,
        "tri_v": tri_v,
        "mat_q": torch.block_diag(*blocks_q),
        "mat_k": torch.block_diag(*blocks_k),
        "p2": st["p2"],
        "entropy_ratio": st["p2"] * n_k,
    }


_ONLY_TOTAL = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def _public(st: dict) -> dict:
    """The attention summary rules read (no tensors)."""
    return {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}


@handles("scaled_dot_product_attention")
def sdpa(ctx: Ctx) -> Effect:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale):
    :func:`attention_core` over the head dimension (the last axis), tokens on the axis
    before it."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if ctx.arg(3, "attn_mask") is not None:
        raise Unhandled("explicit attention mask")
    mq, mk, mv = ctx.meta(q), ctx.meta(k), ctx.meta(v)
    d = mq.shape[-1]
    scale = ctx.arg(6, "scale", None)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    causal = bool(ctx.arg(5, "is_causal", False))
    dropout_p = float(ctx.arg(4, "dropout_p", 0.0) or 0.0)
    sq, sk, sv = ctx.stat(q), ctx.stat(k), ctx.stat(v)
    dv = mv.shape[-1]
    ax = lambda s, m: len(m.shape) - 1 if s.has_channels and s.axis == len(m.shape) - 1 else None  # noqa: E731
    mean_q, var_q, _ = _token_coherence(sq, ax(sq, mq), d, len(mq.shape) - 2)
    _, var_k, cov_k = _token_coherence(sk, ax(sk, mk), d, len(mk.shape) - 2)
    mean_v, var_v, cov_v = _token_coherence(sv, ax(sv, mv), dv, len(mv.shape) - 2)
    h = _Heads(mean_q**2 + var_q, mean_v, var_v, cov_v, (var_k - cov_k).clamp_min(0.0), 1)
    if dv != d:
        raise Unhandled("value head size differs from the query's")
    st = attention_core(h, scale, mq.shape[-2], mk.shape[-2], causal, dropout_p)
    pos = (len(ctx.out_meta.shape) - 2,)
    out_axis = len(ctx.out_meta.shape) - 1 if ax(sv, mv) is not None else None
    if out_axis is not None:
        out = Stats.per_channel(out_axis, st["out_mean"], st["out_m2"], st["out_cov"], pos)
    else:
        out = _stats(float(st["out_mean"].mean()), float(st["out_m2"].mean()), pos, float(st["out_cov"].mean()))
    gains = [
        (q.name, 0, 0, _head_gain(_ONLY_TOTAL, st["mat_q"], ax(sq, mq))),
        (k.name, 0, 0, _head_gain(_ONLY_TOTAL, st["mat_k"], ax(sk, mk))),
        (v.name, 0, 0, channels.Tri(st["tri_v"], axis=ax(sv, mv)) if ax(sv, mv) is not None else channels.Tri(st["tri_v"])),
    ]
    return Effect([out], gains, info={"attention": _public(st), "scale": scale, "head_dim": d})


def _head_gain(tri: torch.Tensor, mat: torch.Tensor, axis: int | None) -> Any:
    """A q/k gain over the head channels, or its scalar sum when channels are not tracked
    (each input channel then collects the row sums of ``mat``, averaged)."""
    if axis is not None:
        return channels.Tri(tri, axis=axis, mat=mat)
    return channels.Tri(tri, float(mat.sum(0).mean()))


@handles("multihead_attention")
def multihead_attention(ctx: Ctx) -> Effect:
    """nn.MultiheadAttention: in-projections, per-head SDPA with scale 1/sqrt(d_head),
    out-projection. Composes :func:`_dense` per channel and :func:`attention_core`; the
    gains chain the projections' squared weights around the core's maps."""
    m = ctx.node.fn
    if not getattr(m, "_qkv_same_embed_dim", True) or m.bias_k is not None:
        raise Unhandled("separate q/k/v projection weights or bias_k")
    if ctx.arg(3, "key_padding_mask") is not None or ctx.arg(5, "attn_mask") is not None:
        raise Unhandled("attention masks")
    causal = bool(ctx.node.kwargs.get("is_causal", False))
    q_ref, k_ref, v_ref = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, heads = m.embed_dim, m.num_heads
    d = e // heads
    w = ctx.param("in_proj_weight").double()
    b = ctx.param("in_proj_bias")
    ws = w.split(e, 0)
    bs = b.double().split(e, 0) if b is not None else (None, None, None)
    seq_dim = 1 if m.batch_first else 0
    feat = len(ctx.meta(q_ref).shape) - 1
    token = (seq_dim,)
    proj = []
    for r, wi, bi in zip((q_ref, k_ref, v_ref), ws, bs):
        s = ctx.stat(r)
        x = s if s.pos == token or s.pos is None else Stats(mean=s.mean, m2=s.m2, axis=s.axis, ch_mean=s.ch_mean, ch_m2=s.ch_m2)
        if x.pos is None:
            x = Stats(mean=x.mean, m2=x.m2, axis=x.axis, ch_mean=x.ch_mean, ch_m2=x.ch_m2, pos=token)
        proj.append(_dense(x, feat, wi * wi, wi, bi, feat, pos=token))
    n_q, n_k = ctx.meta(q_ref).shape[seq_dim], ctx.meta(k_ref).shape[seq_dim]
    scale = 1.0 / math.sqrt(d)
    pq, pk, pv = proj
    mean_v, var_v = pv.channels(feat, e)
    _, var_k = pk.channels(feat, e)
    h = _Heads(pq.ch_m2, mean_v, var_v, pv.coherent(feat, e), (var_k - pk.coherent(feat, e)).clamp_min(0.0), heads)
    st = attention_core(h, scale, n_q, n_k, causal, m.dropout)
    attn = Stats.per_channel(feat, st["out_mean"], st["out_m2"], st["out_cov"], token)
    ow, ob = ctx.param("out_proj.weight").double(), ctx.param("out_proj.bias")
    out = _dense(attn, feat, ow * ow, ow, ob, feat, pos=token)
    m_o = ow * ow
    w2 = [wi * wi for wi in ws]
    gains = [
        (q_ref.name, 0, 0, channels.Tri(_ONLY_TOTAL, axis=feat, mat=m_o @ st["mat_q"] @ w2[0])),
        (k_ref.name, 0, 0, channels.Tri(_ONLY_TOTAL, axis=feat, mat=m_o @ st["mat_k"] @ w2[1])),
        (v_ref.name, 0, 0, channels.Tri(st["tri_v"], axis=feat, mat=m_o @ w2[2])),
    ]
    outs: list[Stats | None] = [out]
    if len(ctx.node.outputs) > 1:
        outs.append(_stats(1.0 / n_k, st["p2"] / n_k) if ctx.node.outputs[1] is not None else None)
    return Effect(outs, gains, info={"attention": _public(st), "scale": scale, "head_dim": d})


# --------------------------------------------------------------------------- linear maps
@handles("interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle", "pixel_unshuffle")
def linear_map(ctx: Ctx) -> Effect:
    """Any fixed linear map L without weights (interpolation, pixel shuffle).

    For independent inputs with mean mu and variance v: E[(Lx)_i^2] = v ||L_i||^2 +
    mu^2 (L 1)_i^2 and gain = ||L||_F^2 / numel(in). ||L||_F^2 = E||L z||^2 for z ~ N(0, I)
    is measured on a few single-channel probes (Hutchinson), which is exact in
    expectation and cheap because L acts on each channel alike.
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    x_meta = ctx.meta(ref)
    fn = ctx.node.fn
    shape = list(x_meta.shape)
    if ctx.node.op.startswith("pixel") or len(shape) < 3:
        return layout(ctx)
    probes = 8
    shape[0], shape[1] = probes, 1
    gen = torch.Generator().manual_seed(_SAMPLER_SEED)
    z = torch.randn(*shape, generator=gen)
    args = [z if a is ref else a for a in ctx.node.args]
    kwargs = {k: (z if a is ref else a) for k, a in ctx.node.kwargs.items()}
    with torch.no_grad():
        lz = fn(*args, **kwargs)
        args1 = [torch.ones_like(z[:1]) if a is z else a for a in args]
        kwargs1 = {k: (torch.ones_like(z[:1]) if a is z else a) for k, a in kwargs.items()}
        l1 = fn(*args1, **kwargs1)
    fro_per_out = float(lz.double().pow(2).mean())  # ||L_i||^2 averaged over outputs
    mean_row = l1.double()
    m2 = x.var * fro_per_out + x.mean**2 * float(mean_row.pow(2).mean())
    gain = fro_per_out * lz[0].numel() / z[0].numel()
    return Effect([_stats(x.mean * float(mean_row.mean()), m2)], [(ref.name, 0, 0, gain)])


from gradaudit.propagation import constants, recurrent  # noqa: E402,F401  (they register in this table)
