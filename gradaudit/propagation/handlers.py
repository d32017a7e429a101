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
from functools import lru_cache
from typing import Any, Callable

import torch

from gradaudit.ir import Node, Ref, Stats, TensorMeta
from gradaudit.propagation import channels
from gradaudit.propagation.moments import gaussian_points, max_of_k_weights

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


def _stats(mean: float, m2: float) -> Stats:
    return Stats(mean=float(mean), m2=max(float(m2), float(mean) ** 2))


def _ratio(a: TensorMeta, b: TensorMeta) -> float:
    return a.numel / b.numel if b.numel else 0.0


# --------------------------------------------------------------------------- layout
def _keep(s: Stats) -> Stats:
    """A copy of ``s`` (channel detail included) for an output with the same values."""
    if s.has_channels:
        return Stats.per_channel(s.axis, s.ch_mean, s.ch_m2)
    return _stats(s.mean, s.m2)


def _moved(s: Stats, axis: int | None, r: int = 1) -> Stats:
    """``s`` with its channels now on ``axis`` (each repeated r times), or scalar."""
    if axis is None or not s.has_channels:
        return _stats(s.mean, s.m2)
    if r == 1:
        return Stats.per_channel(axis, s.ch_mean, s.ch_m2)
    return Stats.per_channel(axis, s.ch_mean.repeat_interleave(r), s.ch_m2.repeat_interleave(r))


def _layout_axis(ctx: Ctx, s: Stats, in_meta: TensorMeta) -> tuple[int | None, int]:
    """Where the channel axis goes through a permutation or reshape (None: mixed)."""
    if not s.has_channels:
        return None, 1
    op, out_shape, nd = ctx.node.op, ctx.out_meta.shape, len(in_meta.shape)
    if in_meta.shape == out_shape and op not in ("permute", "transpose", "t", "movedim", "flip", "roll"):
        return s.axis, 1
    if op in ("flip", "roll"):
        return s.axis, 1
    if op == "permute":
        dims = ctx.node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if "dims" in ctx.node.kwargs:
            dims = ctx.node.kwargs["dims"]
        return channels.permuted_axis(s.axis, dims, nd), 1
    if op in ("transpose", "t"):
        d0, d1 = (ctx.arg(1, "dim0", 0), ctx.arg(2, "dim1", 1)) if op == "transpose" else (0, 1)
        d0, d1 = channels.normalize_axis(d0, nd), channels.normalize_axis(d1, nd)
        return {d0: d1, d1: d0}.get(s.axis, s.axis), 1
    if op in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"):
        found = channels.reshaped_axis(in_meta.shape, s.axis, out_shape)
        return found if found is not None else (None, 1)
    return None, 1


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
    statistics over its spatial block).
    """
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    in_meta = ctx.meta(ref)
    ratio = _ratio(ctx.out_meta, in_meta)
    axis, r = _layout_axis(ctx, s, in_meta)
    out = _moved(s, axis, r)
    if axis is None:
        gain: Any = ratio
    elif r == 1:
        gain = channels.Diag(ratio)
    else:
        gain = channels.Regroup(r)
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
    return Effect([_stats(s.mean, s.m2)], [(src.name, 0, 0, _ratio(ctx.out_meta, ctx.meta(src)))])


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
        if s.has_channels and dim == s.axis and ctx.node.op != "unbind":
            stop = start + meta.shape[dim]
            out.append(Stats.per_channel(s.axis, s.ch_mean[start:stop], s.ch_m2[start:stop]))
            gains.append((ref.name, 0, k, channels.Place(start, stop, in_meta.shape[dim])))
            start = stop
        elif s.has_channels and dim != s.axis:
            axis = s.axis - 1 if ctx.node.op == "unbind" and dim is not None and dim < s.axis else s.axis
            out.append(_moved(s, axis))
            gains.append((ref.name, 0, k, channels.Diag(meta.numel / in_meta.numel)))
        else:
            out.append(_stats(s.mean, s.m2))
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
        if dim == axis:
            out = Stats.per_channel(axis, torch.cat([st.ch_mean for st in stats]), torch.cat([st.ch_m2 for st in stats]))
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
            return Effect([Stats.per_channel(axis, cm, c2)], [(r.name, 0, 0, channels.Diag(1.0)) for r in refs])
    return Effect([_stats(mean, m2)], [(r.name, 0, 0, 1.0) for r in refs])


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
    return Effect([_stats(frac * s.mean + (1 - frac) * c, frac * s.m2 + (1 - frac) * c * c)], [(ref.name, 0, 0, 1.0)])


# --------------------------------------------------------------------------- dense
def _dense(x: Stats, in_axis: int, w2: torch.Tensor, wsum: torch.Tensor, bias: torch.Tensor | None, out_axis: int) -> Stats:
    """y_c = sum_c' W_cc' x_c' + b_c with independent inputs of per-channel mean mu_c'
    and variance v_c' (He et al. 2015; Glorot & Bengio 2010):

        E[y_c] = sum_c' W_cc' mu_c' + b_c,   Var[y_c] = sum_c' W_cc'^2 v_c'

    ``w2`` / ``wsum`` are the (C_out, C_in) matrices of summed squared / plain weights
    (for a conv: over the kernel taps that read real inputs, per output position). The
    weights are the ones the user actually initialised.
    """
    mean_in, var_in = x.channels(in_axis, w2.shape[1])
    mean = wsum @ mean_in
    if bias is not None:
        mean = mean + bias.detach().double().reshape(-1)
    var = w2 @ var_in
    return Stats.per_channel(out_axis, mean, var + mean * mean)


def _dense_forward(x: Stats, weight: torch.Tensor, bias: torch.Tensor | None) -> Stats:
    """:func:`_dense` for a (C_out, C_in) weight on a tensor without channel detail."""
    w = weight.detach().double()
    return _dense(x.scalar(), 0, w * w, w, bias, 0).scalar()


@handles("linear")
def linear(ctx: Ctx) -> Effect:
    """Fully connected layer, per output feature (see :func:`_dense`).

    Backward: dL/dx_j = sum_i W_ij dL/dy_i, so E[(dL/dx_j)^2] = sum_i W_ij^2
    E[(dL/dy_i)^2]; with uniform output gradients the gain is ||W||_F^2 / fan_in.
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
    out = _dense(x, in_axis, w2, w, bias, len(ctx.out_meta.shape) - 1)
    return Effect([out], [(ref.name, 0, 0, channels.Mat(w2, axis=in_axis))])


def valid_taps(n_in: int, n_out: int, k: int, stride: int, pad: int, dil: int) -> list[int]:
    """For each kernel tap j, how many output positions o read a real (unpadded) input:
    #{o in [0, n_out) : 0 <= o*stride + j*dil - pad < n_in}."""
    counts = []
    for j in range(k):
        off = j * dil - pad
        counts.append(sum(1 for o in range(n_out) if 0 <= o * stride + off < n_in))
    return counts


def _tap_weighted(block: torch.Tensor, counts: list[list[int]], power: int) -> torch.Tensor:
    """sum over taps t of W[:, :, t]^power * prod_d count_d[t_d] -> (C_out, C_in)."""
    taps = torch.ones((), dtype=block.dtype)
    for cnt in counts:
        taps = torch.outer(taps.reshape(-1), torch.tensor(cnt, dtype=block.dtype))
    w = block.reshape(block.shape[0] * block.shape[1], -1)
    if power == 2:
        w = w * w
    return (w @ taps.reshape(-1)).reshape(block.shape[0], block.shape[1]).double()


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
    else:  # reflect / replicate / circular padding: every tap reads a real value
        counts = [[o_sp[d]] * ksize[d] for d in range(nd)]
    blocks = _conv_blocks(weight, groups, transposed)
    n_x, n_y = math.prod(x_sp), math.prod(y_sp)
    w2 = _block_diag([_tap_weighted(b, counts, 2) for b in blocks])
    wsum = _block_diag([_tap_weighted(b, counts, 1) for b in blocks])
    axis_in, axis_out = len(x_meta.shape) - nd - 1, len(y_meta.shape) - nd - 1
    out = _dense(ctx.stat(ref), axis_in, w2 / n_y, wsum / n_y, bias, axis_out)
    return Effect([out], [(ref.name, 0, 0, channels.Mat(w2 / n_x, axis=axis_in))])


@handles("embedding")
def embedding(ctx: Ctx) -> Effect:
    """Lookup of rows of W: each output feature c has the statistics of column W[:, c]
    (ids uniform over the table)."""
    weight = ctx.param("weight") if ctx.node.kind == "call_module" else ctx.const(ctx.arg(1, "weight"))
    if weight is None:
        raise Unhandled("embedding with a computed table")
    w = weight.detach().double()
    return Effect([Stats.per_channel(len(ctx.out_meta.shape) - 1, w.mean(0), w.pow(2).mean(0))], [])


# --------------------------------------------------------------------------- norms
def _affine(weight, bias, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = weight.detach().double().reshape(-1) if weight is not None else torch.ones(n, dtype=torch.float64)
    b = bias.detach().double().reshape(-1) if bias is not None else torch.zeros(n, dtype=torch.float64)
    if g.numel() != n:
        g = torch.full((n,), float(g.pow(2).mean().sqrt()), dtype=torch.float64)
    if b.numel() != n:
        b = torch.full((n,), float(b.mean()), dtype=torch.float64)
    return g, b


def _normalized(ref: Ref, axis: int, gamma, beta, xhat_mean, xhat_m2, inv_var, keep: float) -> Effect:
    """y = gamma * x_hat + beta per channel, and its backward.

    Backward (Ioffe & Szegedy 2015): dL/dx = gamma/sigma * P(dL/dy), where P projects
    out the directions the statistics were computed along (the mean and x_hat; RMSNorm:
    x_hat only); over a group of n elements it keeps (n - k)/n of the second moment:
    E[(dL/dx_c)^2] = gamma_c^2 / (var + eps) * (n - k)/n * E[(dL/dy_c)^2].
    """
    mean = gamma * xhat_mean + beta
    m2 = gamma * gamma * xhat_m2 + 2 * gamma * beta * xhat_mean + beta * beta
    gain = gamma * gamma * inv_var * keep
    return Effect([Stats.per_channel(axis, mean, m2)], [(ref.name, 0, 0, channels.Diag(gain, axis=axis))])


def _keep_fraction(n: float, projected: int) -> float:
    return max(n - projected, 0) / n if n else 0.0


@handles("batch_norm")
def batch_norm(ctx: Ctx) -> Effect:
    """BatchNorm in training mode: each channel normalised over batch and positions.

    x_hat_c has mean 0 and second moment v_c / (v_c + eps); see :func:`_normalized`
    (k = 2, n = elements per channel)."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps", 1e-5)
    else:
        weight, bias = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias"))
        eps = ctx.arg(7, "eps", 1e-5)
    axis = 1 if len(meta.shape) > 1 else 0
    c = meta.shape[axis]
    n = meta.numel / c
    _, var = ctx.stat(ref).channels(axis, c)
    gamma, beta = _affine(weight, bias, c)
    zero = torch.zeros(c, dtype=torch.float64)
    return _normalized(ref, axis, gamma, beta, zero, var / (var + eps), 1.0 / (var + eps), _keep_fraction(n, 2))


@handles("layer_norm", "rms_norm")
def layer_norm(ctx: Ctx) -> Effect:
    """LayerNorm (Ba et al. 2016) / RMSNorm (Zhang & Sennrich 2019) over the last dims.

    Per sample the statistics run over the features, so feature c of x_hat has mean
    (mu_c - mu) / sigma and second moment (v_c + (mu_c - mu)^2) / sigma^2, with mu and
    sigma^2 the averages over features (RMSNorm: x_hat_c = x_c / rms, rms^2 = E[x^2]).
    See :func:`_normalized` (k = 2, or 1 for RMSNorm; n = normalised elements)."""
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
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    n = math.prod(_tuple(shape, 1))
    x = ctx.stat(ref)
    axis = len(meta.shape) - 1
    c = meta.shape[axis]
    mean_c, var_c = x.channels(axis, c)
    if n != c:  # normalised over several dims: no per-feature detail
        mean_c = torch.full((c,), x.mean, dtype=torch.float64)
        var_c = torch.full((c,), x.var, dtype=torch.float64)
    gamma, beta = _affine(weight, bias, c)
    if rms:
        ms = float((var_c + mean_c * mean_c).mean()) + eps
        return _normalized(ref, axis, gamma, beta, mean_c / math.sqrt(ms), (var_c + mean_c**2) / ms, torch.full((c,), 1 / ms, dtype=torch.float64), _keep_fraction(n, 1))
    mu = float(mean_c.mean())
    var = float((var_c + (mean_c - mu) ** 2).mean()) + eps
    return _normalized(ref, axis, gamma, beta, (mean_c - mu) / math.sqrt(var), (var_c + (mean_c - mu) ** 2) / var, torch.full((c,), 1 / var, dtype=torch.float64), _keep_fraction(n, 2))


def _group_effect(ctx: Ctx, ref: Ref, groups: int, weight, bias, eps: float) -> Effect:
    """Per (sample, group of channels) normalisation: channel c in group G gets x_hat
    with mean (mu_c - mu_G)/sigma_G and second moment (v_c + (mu_c - mu_G)^2)/sigma_G^2."""
    meta = ctx.meta(ref)
    c = meta.shape[1]
    mean_c, var_c = ctx.stat(ref).channels(1, c)
    n = meta.numel / (meta.shape[0] * groups)
    mg = mean_c.reshape(groups, -1)
    vg = var_c.reshape(groups, -1)
    mu = mg.mean(1, keepdim=True)
    var = (vg + (mg - mu) ** 2).mean(1, keepdim=True) + eps
    xm = ((mg - mu) / var.sqrt()).reshape(-1)
    x2 = ((vg + (mg - mu) ** 2) / var).reshape(-1)
    inv = (1.0 / var).expand_as(mg).reshape(-1)
    gamma, beta = _affine(weight, bias, c)
    return _normalized(ref, 1, gamma, beta, xm, x2, inv, _keep_fraction(n, 2))


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
    way, gain 1 / (1 - p). Channels keep their own statistics.
    """
    p = ctx.attr("p") if ctx.node.kind == "call_module" else ctx.arg(1, "p", 0.5)
    training = ctx.arg(2, "training", True) if ctx.node.kind != "call_module" else True
    return _inverted_mask(ctx, p, training)


@handles("stochastic_depth", "drop_path")
def stochastic_depth(ctx: Ctx) -> Effect:
    """Stochastic depth / DropPath (Huang et al., ECCV 2016): in training mode a whole
    residual branch is dropped per sample (``mode="row"``) or per batch with probability
    p, the kept ones scaled by 1 / (1 - p). Per element that is inverted dropout's mask:
    E[y^2] = E[x^2] / (1 - p), gain 1 / (1 - p) (torchvision's
    ``stochastic_depth(input, p, mode, training)``; timm's ``drop_path(x, drop_prob,
    training, scale_by_keep)``). A sampled estimate would instead drop or keep the whole
    batch at once and read as 0 or 1.
    """
    if ctx.node.kind == "call_module":
        p, training = ctx.attr("p", ctx.attr("drop_prob", 0.0)), ctx.attr("training", True)
    elif ctx.node.op == "stochastic_depth":
        p, training = ctx.arg(1, "p", 0.0), ctx.arg(3, "training", True)
    else:
        p, training = ctx.arg(1, "drop_prob", 0.0), ctx.arg(2, "training", False)
    return _inverted_mask(ctx, float(p), bool(training))


def _inverted_mask(ctx: Ctx, p: float, training: bool) -> Effect:
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    if not training or p == 0:
        return Effect([_keep(x)], [(ref.name, 0, 0, channels.Diag(1.0))])
    if p >= 1:
        return Effect([_stats(0.0, 0.0)], [(ref.name, 0, 0, 0.0)])
    scale = 1.0 / (1 - p)
    if x.has_channels:
        out = Stats.per_channel(x.axis, x.ch_mean, x.ch_m2 * scale)
    else:
        out = _stats(x.mean, x.m2 * scale)
    return Effect([out], [(ref.name, 0, 0, channels.Diag(scale))])


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


def _pool_channels(ctx: Ctx, ref: Ref) -> tuple[Stats, torch.Tensor, torch.Tensor, int]:
    meta = ctx.meta(ref)
    axis = 1 if len(meta.shape) > 2 else 0
    x = ctx.stat(ref)
    mean, var = x.channels(axis, meta.shape[axis])
    return x, mean, var, axis


@handles("max_pool", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d")
def max_pool(ctx: Ctx) -> Effect:
    """Max over windows of k elements, per channel.

    Forward: when the input is a monotone function f of a Gaussian value (ReLU, ...
    after a conv or norm), max f(z_i) = f(max z_i) is integrated exactly under the
    density of the maximum of k Gaussians, k phi(z) Phi(z)^(k-1); otherwise the k
    inputs are treated as Gaussians with the input's moments.

    Backward: each window routes its gradient to its arg-max, so the summed squared
    gradient is preserved: gain = numel(out) / numel(in) -- but only arg-max elements
    receive it, which the engine accounts for upstream (:class:`channels.AtMax`).
    """
    ref = ctx.first_ref()
    _, mean, var, axis = _pool_channels(ctx, ref)
    k = max(int(round(_window(ctx, ref))), 1)
    exact = ctx.engine.fused_max_moments(ref.name, k)
    if exact is not None:
        out = Stats.per_channel(axis, *exact) if exact[0].dim() else _stats(float(exact[0]), float(exact[1]))
    else:
        em, em2 = _max_of_normals(k)
        sd = var.sqrt()
        out = Stats.per_channel(axis, mean + sd * em, mean * mean + 2 * mean * sd * em + var * em2)
    return Effect([out], [(ref.name, 0, 0, channels.AtMax(_ratio(ctx.out_meta, ctx.meta(ref)), k, axis=axis))])


@handles("avg_pool", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
def avg_pool(ctx: Ctx) -> Effect:
    """Mean over windows of k independent elements: E[y_c^2] = mu_c^2 + v_c / k.

    Backward: every input receives dL/dy / k from each window it belongs to:
    gain = numel(out) / (k numel(in)).
    """
    ref = ctx.first_ref()
    _, mean, var, axis = _pool_channels(ctx, ref)
    k = _window(ctx, ref)
    out = Stats.per_channel(axis, mean, mean * mean + var / k)
    return Effect([out], [(ref.name, 0, 0, channels.Diag(_ratio(ctx.out_meta, ctx.meta(ref)) / k, axis=axis))])


# --------------------------------------------------------------------------- reductions
def _reduction(ctx: Ctx, ref: Ref) -> tuple[float, int | None]:
    """Elements per output element, and where the input's channel axis ends up."""
    meta = ctx.meta(ref)
    n = meta.numel / max(ctx.out_meta.numel, 1)
    x = ctx.stat(ref)
    if not x.has_channels:
        return n, None
    nd = len(meta.shape)
    dims = ctx.arg(1, "dim", None)
    if dims is None:
        return n, None
    dims = [channels.normalize_axis(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if x.axis in dims:
        return n, None
    keepdim = bool(ctx.arg(2, "keepdim", False))
    return n, x.axis if keepdim else x.axis - sum(1 for d in dims if d < x.axis)


@handles("mean")
def mean(ctx: Ctx) -> Effect:
    """Mean of n independent elements: E[y^2] = mu^2 + v/n per channel; gain 1/n^2."""
    ref = ctx.first_ref()
    n, axis = _reduction(ctx, ref)
    x = ctx.stat(ref)
    if axis is not None:
        mu, var = x.channels(x.axis, x.ch_mean.numel())
        return Effect([Stats.per_channel(axis, mu, mu * mu + var / n)], [(ref.name, 0, 0, channels.Diag(1.0 / n**2))])
    return Effect([_stats(x.mean, x.mean**2 + x.var / n)], [(ref.name, 0, 0, 1.0 / n**2)])


@handles("sum")
def sum_(ctx: Ctx) -> Effect:
    """Sum of n independent elements: E[y^2] = n v + n^2 mu^2 per channel; gain 1."""
    ref = ctx.first_ref()
    n, axis = _reduction(ctx, ref)
    x = ctx.stat(ref)
    if axis is not None:
        mu, var = x.channels(x.axis, x.ch_mean.numel())
        return Effect([Stats.per_channel(axis, n * mu, n * var + (n * mu) ** 2)], [(ref.name, 0, 0, channels.Diag(1.0))])
    return Effect([_stats(n * x.mean, n * x.var + (n * x.mean) ** 2)], [(ref.name, 0, 0, 1.0)])


# --------------------------------------------------------------------------- arithmetic
def _numel_gain(ctx: Ctx, ref: Ref) -> float:
    """Broadcast inputs collect the gradients of all their copies."""
    return _ratio(ctx.out_meta, ctx.meta(ref))


def _operand(ctx: Ctx, a: Any) -> tuple[Stats, Ref | None]:
    if isinstance(a, Ref):
        return ctx.stat(a), a
    if isinstance(a, (int, float, bool)):
        return _stats(float(a), float(a) ** 2), None
    raise Unhandled(f"operand {a!r}")


def _binary_channels(ctx: Ctx, a: Any, b: Any) -> tuple[int, list] | None:
    """Per-channel (mean, m2) vectors of both operands on a shared channel axis of the
    output, when at least one carries channels and the other is compatible: same
    channels, a python number, or a constant varying only along that axis (a bias)."""
    out_shape = ctx.out_meta.shape
    sa = ctx.stat(a) if isinstance(a, Ref) else None
    sb = ctx.stat(b) if isinstance(b, Ref) else None
    lead = next((s for s, r in ((sa, a), (sb, b)) if s is not None and s.has_channels and ctx.meta(r).shape == out_shape), None)
    if lead is None:
        return None
    axis, c = lead.axis, out_shape[lead.axis]
    vecs = []
    for op, s in ((a, sa), (b, sb)):
        if isinstance(op, (int, float, bool)):
            v = torch.full((c,), float(op), dtype=torch.float64)
            vecs.append((v, v * v, None))
            continue
        if not isinstance(op, Ref):
            return None
        const = ctx.const(op)
        if ctx.meta(op).shape == out_shape and s.has_channels and s.axis == axis:
            vecs.append((s.ch_mean, s.ch_m2, "same"))
        elif const is not None:
            v = channels.broadcast_channel_vector(const, out_shape, axis)
            if v is None:
                return None
            vecs.append((v, v * v, "const"))
        elif ctx.meta(op).shape == out_shape and not s.has_channels:
            vecs.append((torch.full((c,), s.mean, dtype=torch.float64), torch.full((c,), s.m2, dtype=torch.float64), "same"))
        else:
            return None
    return axis, vecs


@handles("add", "sub", "rsub")
def add(ctx: Ctx) -> Effect:
    """Sum of independent values (a residual connection): E[(a+b)^2] = E[a^2] + E[b^2]
    + 2 E[a] E[b], per channel; each input receives the full gradient (times its
    broadcast count). ``alpha`` scales b."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    alpha = float(ctx.node.kwargs.get("alpha", 1.0))
    c = -alpha if ctx.node.op in ("sub", "rsub") else alpha
    if ctx.node.op == "rsub":  # rsub(x, y) = y - alpha * x
        a, b = b, a
    chan = _binary_channels(ctx, a, b)
    if chan is not None:
        axis, ((ma, qa, ka), (mb, qb, kb)) = chan
        out = Stats.per_channel(axis, ma + c * mb, qa + c * c * qb + 2 * c * ma * mb)
        gains = []
        if isinstance(a, Ref):
            gains.append((a.name, 0, 0, channels.Diag(1.0) if ka == "same" else _numel_gain(ctx, a)))
        if isinstance(b, Ref):
            gains.append((b.name, 0, 0, channels.Diag(c * c) if kb == "same" else c * c * _numel_gain(ctx, b)))
        return Effect([out], gains)
    sa, ra = _operand(ctx, a)
    sb, rb = _operand(ctx, b)
    mean = sa.mean + c * sb.mean
    m2 = sa.m2 + c * c * sb.m2 + 2 * c * sa.mean * sb.mean
    gains = []
    if ra is not None:
        gains.append((ra.name, 0, 0, _numel_gain(ctx, ra)))
    if rb is not None:
        gains.append((rb.name, 0, 0, c * c * _numel_gain(ctx, rb)))
    return Effect([_stats(mean, m2)], gains)


@handles("mul")
def mul(ctx: Ctx) -> Effect:
    """Product of independent values (gating, a per-channel scale): E[(ab)^2] =
    E[a^2] E[b^2] per channel; dL/da = b dL/dy, so gain(a) = E[b^2] (times a's broadcast
    count)."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    chan = _binary_channels(ctx, a, b)
    if chan is not None:
        axis, ((ma, qa, ka), (mb, qb, kb)) = chan
        out = Stats.per_channel(axis, ma * mb, qa * qb)
        gains = []
        if isinstance(a, Ref):
            gains.append((a.name, 0, 0, channels.Diag(qb) if ka == "same" else float(qb.mean()) * _numel_gain(ctx, a)))
        if isinstance(b, Ref):
            gains.append((b.name, 0, 0, channels.Diag(qa) if kb == "same" else float(qa.mean()) * _numel_gain(ctx, b)))
        return Effect([out], gains)
    sa, ra = _operand(ctx, a)
    sb, rb = _operand(ctx, b)
    gains = []
    if ra is not None:
        gains.append((ra.name, 0, 0, sb.m2 * _numel_gain(ctx, ra)))
    if rb is not None:
        gains.append((rb.name, 0, 0, sa.m2 * _numel_gain(ctx, rb)))
    return Effect([_stats(sa.mean * sb.mean, sa.m2 * sb.m2)], gains)


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
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    meta = ctx.meta(ref)
    dim = ctx.arg(1, "dim", None) if ctx.node.kind != "call_module" else ctx.attr("dim")
    if dim is None:
        dim = -1
    n = meta.shape[dim]
    mean, var = (x.mean, x.var) if ctx.node.op != "softmin" else (-x.mean, x.var)
    if ctx.node.op == "log_softmax":
        ls = _log_softmax_sample(round(mean, 9), round(var, 9), n)
        return Effect([_stats(ls[0], ls[1])], [(ref.name, 0, 0, ls[2])])
    st = _softmax_sample(mean, var, n)
    return Effect([_stats(st["p_mean"], st["p_m2"])], [(ref.name, 0, 0, st["jac"] / n)])


@lru_cache(maxsize=128)
def _log_softmax_sample(mean: float, var: float, n: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(_SAMPLER_SEED)
    rows = max(4096 // max(n, 1), 64)
    s = mean + math.sqrt(max(var, 0.0)) * torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y = torch.log_softmax(s, dim=-1)
    p = y.exp()
    gain = 1 - 2 * p.mean() + p.pow(2).sum(-1).mean()
    return float(y.mean()), float(y.pow(2).mean()), float(gain)


def attention_stats(q: Stats, k: Stats, v: Stats, d: int, n_q: int, n_k: int, scale: float, causal: bool, dropout_p: float = 0.0) -> dict[str, float]:
    """Scaled dot-product attention softmax(s q k^T) v at initialisation (Vaswani 2017).

    Logits: Var[l] = s^2 d E[q^2] E[k^2] (and mean s d mu_q mu_k). With P the attention
    matrix and p2 = E[sum_j P_ij^2]:

        E[o^2] = p2 Var[v] + mu_v^2
        gain(v) = (n_q / n_k) p2                 (dL/dv = P^T dL/do)
        gain(q) = s^2 n_k E[k^2] * d Var[v] jac / n_k^2 ... per element, see code
        gain(k) = s^2 n_q E[q^2] * d Var[v] jac / n_k^2

    where dL/dP = dL/do V^T has second moment d Var[v] per entry and ``jac`` is the
    softmax Jacobian norm from :func:`_softmax_sample`.
    """
    logit_mean = scale * d * q.mean * k.mean
    logit_var = scale**2 * d * (q.m2 * k.m2 - (q.mean * k.mean) ** 2)
    st = _softmax_sample(logit_mean, logit_var, n_k, causal_rows=n_q if causal else 0)
    keep = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    p2 = st["p2"] * keep
    out_m2 = p2 * v.var + v.mean**2
    dp2 = d * v.var * keep  # second moment of dL/dP per entry, per unit g2
    g_logit = dp2 * st["jac"] / n_k  # per logit entry
    return {
        "logit_var": logit_var,
        "logit_std": math.sqrt(max(logit_var, 0.0)),
        "out_mean": v.mean,
        "out_m2": out_m2,
        "gain_v": n_q / n_k * p2,
        "gain_q": scale**2 * n_k * k.m2 * g_logit,
        "gain_k": scale**2 * n_q * q.m2 * g_logit,
        "p2": st["p2"],
        "entropy_ratio": st["p2"] * n_k,
    }


@handles("scaled_dot_product_attention")
def sdpa(ctx: Ctx) -> Effect:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if ctx.arg(3, "attn_mask") is not None:
        raise Unhandled("explicit attention mask")
    mq, mk = ctx.meta(q), ctx.meta(k)
    d = mq.shape[-1]
    scale = ctx.arg(6, "scale", None)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    causal = bool(ctx.arg(5, "is_causal", False))
    dropout_p = float(ctx.arg(4, "dropout_p", 0.0) or 0.0)
    st = attention_stats(ctx.stat(q), ctx.stat(k), ctx.stat(v), d, mq.shape[-2], mk.shape[-2], scale, causal, dropout_p)
    gains = [(q.name, 0, 0, st["gain_q"]), (k.name, 0, 0, st["gain_k"]), (v.name, 0, 0, st["gain_v"])]
    return Effect([_stats(st["out_mean"], st["out_m2"])], gains, info={"attention": st, "scale": scale, "head_dim": d})


@handles("multihead_attention")
def multihead_attention(ctx: Ctx) -> Effect:
    """nn.MultiheadAttention: in-projections, per-head SDPA with scale 1/sqrt(d_head),
    out-projection. Composes :func:`_dense_forward` and :func:`attention_stats`."""
    m = ctx.node.fn
    if not getattr(m, "_qkv_same_embed_dim", True) or m.bias_k is not None:
        raise Unhandled("separate q/k/v projection weights or bias_k")
    if ctx.arg(3, "key_padding_mask") is not None or ctx.arg(5, "attn_mask") is not None:
        raise Unhandled("attention masks")
    causal = bool(ctx.node.kwargs.get("is_causal", False))
    q_ref, k_ref, v_ref = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, h = m.embed_dim, m.num_heads
    d = e // h
    w = ctx.param("in_proj_weight")
    b = ctx.param("in_proj_bias")
    ws = w.split(e, 0)
    bs = b.split(e, 0) if b is not None else (None, None, None)
    ins = [ctx.stat(r) for r in (q_ref, k_ref, v_ref)]
    proj = [_dense_forward(s, wi, bi) for s, wi, bi in zip(ins, ws, bs)]
    seq_dim = 1 if m.batch_first else 0
    n_q, n_k = ctx.meta(q_ref).shape[seq_dim], ctx.meta(k_ref).shape[seq_dim]
    scale = 1.0 / math.sqrt(d)
    st = attention_stats(proj[0], proj[1], proj[2], d, n_q, n_k, scale, causal, m.dropout)
    attn = _stats(st["out_mean"], st["out_m2"])
    ow, ob = ctx.param("out_proj.weight"), ctx.param("out_proj.bias")
    out = _dense_forward(attn, ow, ob)
    g_out = float(ow.double().pow(2).sum()) / e  # into the attention output
    in_gain = [float(wi.double().pow(2).sum()) / e for wi in ws]
    gains = [
        (q_ref.name, 0, 0, g_out * st["gain_q"] * in_gain[0]),
        (k_ref.name, 0, 0, g_out * st["gain_k"] * in_gain[1]),
        (v_ref.name, 0, 0, g_out * st["gain_v"] * in_gain[2]),
    ]
    outs: list[Stats | None] = [out]
    if len(ctx.node.outputs) > 1:
        outs.append(_stats(1.0 / n_k, st["p2"] / n_k) if ctx.node.outputs[1] is not None else None)
    return Effect(outs, gains, info={"attention": st, "scale": scale, "head_dim": d})


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
