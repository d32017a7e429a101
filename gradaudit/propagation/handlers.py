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
        self._engine = engine

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
        s = self._engine.leaf_stats(ref.name, leaf)
        if s is None:
            raise Unhandled(f"input '{ref.name}' has no floating statistics")
        return s

    def meta(self, ref: Ref, leaf: int = 0) -> TensorMeta:
        m = self._engine.graph[ref.name].outputs[leaf]
        if m is None:
            raise Unhandled(f"input '{ref.name}' has no tensor metadata")
        return m

    def const(self, ref: Any) -> torch.Tensor | None:
        """The real tensor behind ``ref`` when it is a parameter or constant."""
        if isinstance(ref, torch.Tensor):
            return ref
        if isinstance(ref, Ref):
            node = self._engine.graph[ref.name]
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
@handles(
    "identity", "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t",
    "contiguous", "squeeze", "unsqueeze", "expand", "repeat", "to", "clone", "flip",
    "roll", "narrow", "select", "movedim", "chunk_view", "tile", "repeat_interleave",
    "alias", "cpu", "cuda",
)
def layout(ctx: Ctx) -> Effect:
    """Reshuffle, copy or subset elements: values keep their statistics.

    The gradient of an input element is the sum of the gradients of its copies, so the
    per-element gain is numel(out) / numel(in) (1 for a permutation, r for r copies,
    k/n for a subset of k out of n).
    """
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    return Effect([_stats(s.mean, s.m2)], [(ref.name, 0, 0, _ratio(ctx.out_meta, ctx.meta(ref)))])


@handles("getitem")
def getitem(ctx: Ctx) -> Effect:
    """Tuple indexing passes one output through; tensor indexing takes a subset."""
    src, index = ctx.node.args[0], ctx.node.args[1]
    if not isinstance(src, Ref):
        raise Unhandled("getitem of a non-node")
    src_node = ctx._engine.graph[src.name]
    if src_node.tuple_output and isinstance(index, int):
        sub = src_node.structure[index]
        leaves = list(_leaves(sub))
        out, gains = [], []
        for k, leaf in enumerate(leaves):
            s = ctx._engine.leaf_stats(src.name, leaf)
            out.append(None if s is None else _stats(s.mean, s.m2))
            gains.append((src.name, leaf, k, 1.0))
        return Effect(out, gains)
    if isinstance(index, Ref) or (isinstance(index, tuple) and any(isinstance(i, Ref) for i in index)):
        raise Unhandled("indexing with a tensor")
    return layout(ctx)


def _leaves(structure: Any):
    if isinstance(structure, int):
        yield structure
    else:
        for s in structure:
            yield from _leaves(s)


@handles("split", "chunk", "unbind", "tensor_split", "split_with_sizes")
def split(ctx: Ctx) -> Effect:
    """Pieces of one tensor: each keeps the statistics, each passes its gradient back."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    n = len(ctx.node.outputs)
    return Effect([_stats(s.mean, s.m2) for _ in range(n)], [(ref.name, 0, k, 1.0) for k in range(n)])


@handles("cat", "stack", "hstack", "vstack", "concat")
def cat(ctx: Ctx) -> Effect:
    """Concatenation: a numel-weighted mixture forward, gain 1 to every piece."""
    tensors = ctx.arg(0, "tensors")
    refs = [t for t in tensors if isinstance(t, Ref)]
    total = sum(ctx.meta(r).numel for r in refs)
    mean = sum(ctx.stat(r).mean * ctx.meta(r).numel for r in refs) / total
    m2 = sum(ctx.stat(r).m2 * ctx.meta(r).numel for r in refs) / total
    return Effect([_stats(mean, m2)], [(r.name, 0, 0, 1.0) for r in refs])


@handles("detach")
def detach(ctx: Ctx) -> Effect:
    """Same values, no gradient."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    return Effect([_stats(s.mean, s.m2)], [(ref.name, 0, 0, 0.0)])


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
def _dense_forward(x: Stats, weight: torch.Tensor, bias: torch.Tensor | None) -> Stats:
    """y_i = sum_j W_ij x_j + b_i with x_j independent, mean mu, variance v:

        E[y_i] = mu * sum_j W_ij + b_i,   Var[y_i] = v * sum_j W_ij^2

    averaged over output units i (the weights the user actually initialised).
    """
    w = weight.detach().double().reshape(weight.shape[0], -1)
    unit_mean = x.mean * w.sum(1)
    if bias is not None:
        unit_mean = unit_mean + bias.detach().double().reshape(-1)
    var = x.var * float(w.pow(2).sum(1).mean())
    return _stats(float(unit_mean.mean()), var + float(unit_mean.pow(2).mean()))


@handles("linear")
def linear(ctx: Ctx) -> Effect:
    """Fully connected layer (He et al. 2015; Glorot & Bengio 2010).

    Forward: see :func:`_dense_forward`. Backward: dL/dx_j = sum_i W_ij dL/dy_i, so
    E[(dL/dx)^2] = (||W||_F^2 / fan_in) E[(dL/dy)^2]; the gain is n Var[w] with n =
    fan_out for the backward pass.
    """
    ref = ctx.arg(0, "input")
    if ctx.node.kind == "call_module":
        weight, bias = ctx.param("weight"), ctx.param("bias")
    else:
        weight, bias = ctx.const(ctx.arg(1, "weight")), ctx.const(ctx.arg(2, "bias"))
        if weight is None:
            raise Unhandled("linear with a computed weight")
    x = ctx.stat(ref)
    fan_in = weight.shape[1]
    gain = float(weight.detach().double().pow(2).sum()) / fan_in
    return Effect([_dense_forward(x, weight, bias)], [(ref.name, 0, 0, gain)])


def valid_taps(n_in: int, n_out: int, k: int, stride: int, pad: int, dil: int) -> list[int]:
    """For each kernel tap j, how many output positions o read a real (unpadded) input:
    #{o in [0, n_out) : 0 <= o*stride + j*dil - pad < n_in}."""
    counts = []
    for j in range(k):
        off = j * dil - pad
        counts.append(sum(1 for o in range(n_out) if 0 <= o * stride + off < n_in))
    return counts


def _tap_mass(weight: torch.Tensor, spatial_counts: list[list[int]]) -> float:
    """S = sum over taps t of (sum over channels of W[:, :, t]^2) * prod_d count_d[t_d]."""
    w2 = weight.detach().double().pow(2).sum(dim=(0, 1))
    for d, counts in enumerate(spatial_counts):
        shape = [1] * w2.dim()
        shape[d] = len(counts)
        w2 = w2 * torch.tensor(counts, dtype=torch.float64).reshape(shape)
    return float(w2.sum())


def _tap_means(weight: torch.Tensor, spatial_counts: list[list[int]], n_positions: int, out_dim: int) -> torch.Tensor:
    """Per output channel: sum over taps of (sum over input channels of W) * count_t / n."""
    ksum = weight.detach().double().sum(dim=1 - out_dim)  # (C_out, *k)
    for d, counts in enumerate(spatial_counts):
        shape = [1] * ksum.dim()
        shape[d + 1] = len(counts)
        ksum = ksum * torch.tensor(counts, dtype=torch.float64).reshape(shape)
    return ksum.reshape(ksum.shape[0], -1).sum(1) / n_positions


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@handles("conv", "conv1d", "conv2d", "conv3d", "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(ctx: Ctx) -> Effect:
    """Convolution and transposed convolution, with exact border effects.

    For a convolution, y[c, o] = sum over (c', tap t valid at o) of W[c, c', t] x[c', o +
    t]. With S = sum_t (sum_{c,c'} W[c,c',t]^2) * N_t, where N_t counts the output
    positions at which tap t reads a real input (not padding), the averages are

        E[y^2] = v S / (C_out N_out) + E_c[mean_c^2],   gain(x) = S / (C_in N_in)

    A transposed convolution is the adjoint of a convolution, so the same S serves with
    the roles of input and output positions exchanged. Zero padding shrinks both.
    """
    node = ctx.node
    transposed = node.op.startswith("conv_transpose")
    ref = ctx.arg(0, "input")
    x_meta = ctx.meta(ref)
    y_meta = ctx.out_meta
    if node.kind == "call_module":
        m = node.fn
        weight, bias = ctx.param("weight"), ctx.param("bias")
        stride, padding, dilation = m.stride, m.padding, m.dilation
        zero_pad = getattr(m, "padding_mode", "zeros") == "zeros"
    else:
        weight, bias = ctx.const(ctx.arg(1, "weight")), ctx.const(ctx.arg(2, "bias"))
        if weight is None:
            raise Unhandled("convolution with a computed weight")
        stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
        dilation = ctx.arg(6 if transposed else 5, "dilation", 1)
        zero_pad = True
    nd = weight.dim() - 2
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    ksize = tuple(weight.shape[2:])
    x_sp, y_sp = x_meta.shape[-nd:], y_meta.shape[-nd:]
    if isinstance(padding, str):
        padding = (0,) * nd if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, ksize))
    padding = _tuple(padding, nd)
    # "strided side" positions o, "dense side" positions p = o*s + t*d - pad
    o_sp, p_sp = (x_sp, y_sp) if transposed else (y_sp, x_sp)
    if zero_pad:
        counts = [valid_taps(p_sp[d], o_sp[d], ksize[d], stride[d], padding[d], dilation[d]) for d in range(nd)]
    else:  # reflect / replicate / circular padding: every tap reads a real value
        counts = [[o_sp[d]] * ksize[d] for d in range(nd)]
    s_mass = _tap_mass(weight, counts)
    x = ctx.stat(ref)
    c_in, c_out = x_meta.shape[-nd - 1], y_meta.shape[-nd - 1]
    n_x, n_y = math.prod(x_sp), math.prod(y_sp)
    n_o = math.prod(o_sp)
    means = _tap_means(weight, counts, n_y, out_dim=1 if transposed else 0) * x.mean
    if bias is not None:
        means = means + bias.detach().double()
    m2 = x.var * s_mass / (c_out * n_y) + float(means.pow(2).mean())
    del n_o
    gain = s_mass / (c_in * n_x)
    return Effect([_stats(float(means.mean()), m2)], [(ref.name, 0, 0, gain)])


@handles("embedding")
def embedding(ctx: Ctx) -> Effect:
    """Lookup of rows of W: the output has the statistics of W's entries (ids uniform)."""
    weight = ctx.param("weight") if ctx.node.kind == "call_module" else ctx.const(ctx.arg(1, "weight"))
    if weight is None:
        raise Unhandled("embedding with a computed table")
    w = weight.double()
    return Effect([_stats(float(w.mean()), float(w.pow(2).mean()))], [])


# --------------------------------------------------------------------------- norms
def _norm_effect(ref: Ref, x: Stats, n: int, weight, bias, eps: float, projected: int, rms: bool = False) -> Effect:
    """Shared algebra of batch/layer/group/instance/RMS norm in training mode.

    y = gamma * x_hat + beta with x_hat = (x - mu_B) / sqrt(var_B + eps) over a group of n
    elements. Forward: E[y^2] = E[gamma^2] var/(var+eps) + E[beta^2] (+ 2 E[gamma beta]
    E[x_hat], zero). Backward (Ioffe & Szegedy 2015): dL/dx = gamma/sigma * P(dL/dy)
    where P projects out the mean and x_hat directions (RMSNorm: x_hat only), so
    E[(dL/dx)^2] = E[gamma^2] / (var + eps) * (n - k)/n * E[(dL/dy)^2], k = 2 (or 1).
    """
    g2 = float(weight.double().pow(2).mean()) if weight is not None else 1.0
    gm = float(weight.double().mean()) if weight is not None else 1.0
    b2 = float(bias.double().pow(2).mean()) if bias is not None else 0.0
    bm = float(bias.double().mean()) if bias is not None else 0.0
    scale = x.m2 if rms else x.var
    xhat2 = scale / (scale + eps) if scale + eps > 0 else 0.0
    mean = bm + (gm * x.mean / math.sqrt(scale + eps) if rms and scale + eps > 0 else 0.0)
    m2 = g2 * xhat2 + b2 + (2 * gm * bm * x.mean / math.sqrt(scale + eps) if rms and scale + eps > 0 else 0.0)
    keep = max(n - projected, 0) / n if n else 0.0
    gain = g2 / (scale + eps) * keep if scale + eps > 0 else 0.0
    return Effect([_stats(mean, m2)], [(ref.name, 0, 0, gain)])


@handles("batch_norm")
def batch_norm(ctx: Ctx) -> Effect:
    """BatchNorm in training mode: statistics over batch and spatial positions per channel."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps", 1e-5)
    else:
        weight, bias = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias"))
        eps = ctx.arg(7, "eps", 1e-5)
    n = meta.numel // meta.shape[1] if len(meta.shape) > 1 else meta.numel
    return _norm_effect(ref, ctx.stat(ref), n, weight, bias, eps, projected=2)


@handles("layer_norm", "rms_norm")
def layer_norm(ctx: Ctx) -> Effect:
    """LayerNorm (Ba et al. 2016) / RMSNorm (Zhang & Sennrich 2019) over the last dims."""
    ref = ctx.arg(0, "input")
    if ctx.node.kind == "call_module":
        shape = ctx.attr("normalized_shape")
        weight, bias = ctx.param("weight"), ctx.param("bias")
        eps = ctx.attr("eps", 1e-5)
        if eps is None:
            eps = torch.finfo(torch.float32).eps
    else:
        shape = ctx.arg(1, "normalized_shape")
        weight, bias = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias"))
        eps = ctx.arg(4, "eps", 1e-5)
        if ctx.node.op == "rms_norm":
            weight, bias, eps = ctx.const(ctx.arg(2, "weight")), None, ctx.arg(3, "eps", None)
            eps = torch.finfo(torch.float32).eps if eps is None else eps
    n = math.prod(_tuple(shape, 1))
    rms = ctx.node.op == "rms_norm"
    return _norm_effect(ref, ctx.stat(ref), n, weight, bias, eps, projected=1 if rms else 2, rms=rms)


@handles("group_norm")
def group_norm(ctx: Ctx) -> Effect:
    """GroupNorm (Wu & He 2018): statistics over C/G channels and all positions."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        groups, weight, bias, eps = ctx.attr("num_groups"), ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        groups = ctx.arg(1, "num_groups")
        weight, bias, eps = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias")), ctx.arg(4, "eps", 1e-5)
    n = meta.numel // (meta.shape[0] * groups)
    return _norm_effect(ref, ctx.stat(ref), n, weight, bias, eps, projected=2)


@handles("instance_norm")
def instance_norm(ctx: Ctx) -> Effect:
    """InstanceNorm (Ulyanov et al. 2016): statistics per sample and channel."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        weight, bias, eps = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias")), ctx.arg(7, "eps", 1e-5)
    n = math.prod(meta.shape[2:]) if len(meta.shape) > 2 else meta.shape[-1]
    return _norm_effect(ref, ctx.stat(ref), n, weight, bias, eps, projected=2)


# --------------------------------------------------------------------------- dropout
@handles("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout")
def dropout(ctx: Ctx) -> Effect:
    """Inverted dropout in training mode: y = x * m / (1 - p), m ~ Bernoulli(1 - p).

    E[y] = E[x], E[y^2] = E[x^2] / (1 - p); the gradient is masked and scaled the same
    way, gain 1 / (1 - p).
    """
    ref = ctx.first_ref()
    p = ctx.attr("p") if ctx.node.kind == "call_module" else ctx.arg(1, "p", 0.5)
    training = ctx.arg(2, "training", True) if ctx.node.kind != "call_module" else True
    x = ctx.stat(ref)
    if not training or p == 0:
        return Effect([_stats(x.mean, x.m2)], [(ref.name, 0, 0, 1.0)])
    if p >= 1:
        return Effect([_stats(0.0, 0.0)], [(ref.name, 0, 0, 0.0)])
    return Effect([_stats(x.mean, x.m2 / (1 - p))], [(ref.name, 0, 0, 1.0 / (1 - p))])


# --------------------------------------------------------------------------- pooling
_SAMPLER_SEED = 20240521


@lru_cache(maxsize=256)
def _max_moments(k: int, mean: float, std: float) -> tuple[float, float]:
    """E[max] and E[max^2] of k iid N(mean, std^2), by quadrature on the CDF.

    The density of the maximum is k phi(z) Phi(z)^(k-1).
    """
    z = torch.linspace(-12, 12, 8001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    dens = k * pdf * cdf.pow(k - 1)
    dens = dens / dens.sum()
    x = mean + std * z
    return float((dens * x).sum()), float((dens * x * x).sum())


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


@handles("max_pool", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d")
def max_pool(ctx: Ctx) -> Effect:
    """Max over windows of k elements, treated as k independent Gaussians.

    Backward: each window routes its gradient to its arg-max, so the summed squared
    gradient is preserved: gain = numel(out) / numel(in).
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    k = int(round(_window(ctx, ref)))
    mean, m2 = _max_moments(max(k, 1), round(x.mean, 12), round(math.sqrt(x.var), 12))
    return Effect([_stats(mean, m2)], [(ref.name, 0, 0, _ratio(ctx.out_meta, ctx.meta(ref)))])


@handles("avg_pool", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
def avg_pool(ctx: Ctx) -> Effect:
    """Mean over windows of k independent elements: E[y^2] = mu^2 + v/k.

    Backward: every input receives dL/dy / k from each window it belongs to:
    gain = numel(out) / (k numel(in)).
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    k = _window(ctx, ref)
    return Effect([_stats(x.mean, x.mean**2 + x.var / k)], [(ref.name, 0, 0, _ratio(ctx.out_meta, ctx.meta(ref)) / k)])


# --------------------------------------------------------------------------- reductions
def _reduced_count(ctx: Ctx, ref: Ref) -> float:
    return ctx.meta(ref).numel / max(ctx.out_meta.numel, 1)


@handles("mean")
def mean(ctx: Ctx) -> Effect:
    """Mean of n independent elements: E[y^2] = mu^2 + v/n; gain 1/n^2."""
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    n = _reduced_count(ctx, ref)
    return Effect([_stats(x.mean, x.mean**2 + x.var / n)], [(ref.name, 0, 0, 1.0 / n**2)])


@handles("sum")
def sum_(ctx: Ctx) -> Effect:
    """Sum of n independent elements: E[y^2] = n v + n^2 mu^2; gain 1."""
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    n = _reduced_count(ctx, ref)
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


@handles("add", "sub", "rsub")
def add(ctx: Ctx) -> Effect:
    """Sum of independent values (a residual connection): E[(a+b)^2] = E[a^2] + E[b^2]
    + 2 E[a] E[b]; each input receives the full gradient (times its broadcast count).
    ``alpha`` scales b."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    alpha = float(ctx.node.kwargs.get("alpha", 1.0))
    sign = -1.0 if ctx.node.op in ("sub", "rsub") else 1.0
    sa, ra = _operand(ctx, a)
    sb, rb = _operand(ctx, b)
    c = sign * alpha
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
    """Product of independent values (gating): E[(ab)^2] = E[a^2] E[b^2];
    dL/da = b dL/dy, so gain(a) = E[b^2] (times a's broadcast count)."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
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
