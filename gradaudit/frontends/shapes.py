"""Output shapes of common ops from small shape rules, without fake tensors.

Building torch's ``FakeTensorMode`` imports all of ``torch._dynamo`` (about a second of
start-up in torch 2.13), and even meta tensors pull it in for ``add`` or ``batch_norm``.
For the layers most models are made of, the output shape is a line of arithmetic, so
:func:`infer` walks the fx graph with these rules and writes a :class:`Shaped` value
into each node's ``meta["val"]``. Any op without a rule, any argument a rule does not
expect, and any mismatch a rule detects raises :class:`NoRule`: the caller then runs the
fake-tensor pass, which covers every op and words the error precisely. A rule never
guesses.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from gradaudit.frontends.signature import map_tensors


class NoRule(Exception):
    """This graph needs the fake-tensor pass."""


class Shaped:
    """A tensor's shape and dtype, nothing else."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype: torch.dtype) -> None:
        self.shape = torch.Size(int(s) for s in shape)
        self.dtype = dtype

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Shaped({tuple(self.shape)}, {self.dtype})"


def _t(v: Any) -> Shaped:
    if not isinstance(v, Shaped):
        raise NoRule(f"expected a tensor, got {type(v).__name__}")
    return v


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _dim(d: int, nd: int) -> int:
    if not isinstance(d, int) or not -nd <= d < max(nd, 1):
        raise NoRule(f"dim {d!r}")
    return d + nd if d < 0 else d


def _same(x: Any, *_: Any, **__: Any) -> Shaped:
    x = _t(x)
    return Shaped(x.shape, x.dtype)


# ----------------------------------------------------------------------------- modules
def _linear(m: nn.Linear, x: Any) -> Shaped:
    x = _t(x)
    if not x.shape or x.shape[-1] != m.in_features:
        raise NoRule("in_features")
    return Shaped(x.shape[:-1] + (m.out_features,), x.dtype)


def _conv_len(n: int, k: int, s: int, p: int, d: int) -> int:
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise NoRule("empty output")
    return out


def _conv(m: nn.modules.conv._ConvNd, x: Any) -> Shaped:
    x = _t(x)
    nd = len(m.kernel_size)
    if x.dim() != nd + 2 or x.shape[1] != m.in_channels:
        raise NoRule("conv input")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0,) * nd
        else:
            return Shaped(x.shape[:1] + (m.out_channels,) + x.shape[2:], x.dtype)
    else:
        pad = m.padding
    if m.transposed:
        if m.output_padding is None:
            raise NoRule("output_padding")
        spatial = tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, k, s, p, d, op in zip(x.shape[2:], m.kernel_size, m.stride, pad, m.dilation, m.output_padding)
        )
    else:
        spatial = tuple(_conv_len(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], m.kernel_size, m.stride, pad, m.dilation))
    return Shaped(x.shape[:1] + (m.out_channels,) + spatial, x.dtype)


def _channels_checked(count_of: Callable[[nn.Module], int | None]) -> Callable:
    def rule(m: nn.Module, x: Any) -> Shaped:
        x = _t(x)
        c = count_of(m)
        if c is not None and (x.dim() < 2 or x.shape[1] != c):
            raise NoRule("channels")
        return Shaped(x.shape, x.dtype)

    return rule


def _trailing_checked(m: nn.Module, x: Any) -> Shaped:
    x = _t(x)
    norm = tuple(m.normalized_shape)
    if tuple(x.shape[-len(norm):]) != norm:
        raise NoRule("normalized_shape")
    return Shaped(x.shape, x.dtype)


def _pool_len(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    if out < 1:
        raise NoRule("empty output")
    return out


def _pool(m: nn.Module, x: Any) -> Shaped:
    x = _t(x)
    if getattr(m, "return_indices", False):
        raise NoRule("indices")
    nd = int(type(m).__name__[-2])
    if x.dim() not in (nd + 1, nd + 2):
        raise NoRule("pool input")
    k = _tuple(m.kernel_size, nd)
    s = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
    p = _tuple(m.padding, nd)
    d = _tuple(getattr(m, "dilation", 1), nd)
    spatial = tuple(_pool_len(n, *a, m.ceil_mode) for n, *a in zip(x.shape[-nd:], k, s, p, d))
    return Shaped(x.shape[:-nd] + spatial, x.dtype)


def _adaptive(m: nn.Module, x: Any) -> Shaped:
    x = _t(x)
    if getattr(m, "return_indices", False):
        raise NoRule("indices")
    nd = int(type(m).__name__[-2])
    size = _tuple(m.output_size, nd)
    spatial = tuple(n if o is None else o for n, o in zip(x.shape[-nd:], size))
    return Shaped(x.shape[:-nd] + spatial, x.dtype)


def _flatten_shape(shape: torch.Size, start: int, end: int) -> torch.Size:
    nd = len(shape)
    if nd == 0:
        return torch.Size([1])
    start, end = _dim(start, nd), _dim(end, nd)
    return shape[:start] + (math.prod(shape[start : end + 1]),) + shape[end + 1 :]


def _flatten_module(m: nn.Flatten, x: Any) -> Shaped:
    x = _t(x)
    return Shaped(_flatten_shape(x.shape, m.start_dim, m.end_dim), x.dtype)


def _embedding(m: nn.Embedding, ids: Any) -> Shaped:
    ids = _t(ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise NoRule("ids dtype")
    return Shaped(ids.shape + (m.embedding_dim,), m.weight.dtype)


def _mha(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> tuple:
    q, k, v = _t(query), _t(key), _t(value)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[-1] != m.embed_dim:
        raise NoRule("attention input")
    if k.shape[-1] != m.kdim or v.shape[-1] != m.vdim or k.shape[:-1] != v.shape[:-1]:
        raise NoRule("key/value")
    names = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    opts = dict(zip(names, args)) | kwargs
    b_dim, s_dim = (0, 1) if m.batch_first else (1, 0)
    if q.shape[b_dim] != k.shape[b_dim]:
        raise NoRule("batch")
    out = Shaped(q.shape, q.dtype)
    if not opts.get("need_weights", True):
        return out, None
    n, lq, lk = q.shape[b_dim], q.shape[s_dim], k.shape[s_dim]
    w = (n, lq, lk) if opts.get("average_attn_weights", True) else (n, m.num_heads, lq, lk)
    return out, Shaped(w, q.dtype)


_SAME_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
MODULE_RULES: dict[type, Callable] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv, nn.ConvTranspose2d: _conv, nn.ConvTranspose3d: _conv,
    nn.BatchNorm1d: _channels_checked(lambda m: m.num_features),
    nn.BatchNorm2d: _channels_checked(lambda m: m.num_features),
    nn.BatchNorm3d: _channels_checked(lambda m: m.num_features),
    nn.GroupNorm: _channels_checked(lambda m: m.num_channels),
    nn.InstanceNorm1d: _channels_checked(lambda m: m.num_features if m.affine else None),
    nn.InstanceNorm2d: _channels_checked(lambda m: m.num_features if m.affine else None),
    nn.LayerNorm: _trailing_checked,
    nn.RMSNorm: _trailing_checked,
    nn.MaxPool1d: _pool, nn.MaxPool2d: _pool, nn.MaxPool3d: _pool,
    nn.AvgPool1d: _pool, nn.AvgPool2d: _pool, nn.AvgPool3d: _pool,
    nn.AdaptiveAvgPool1d: _adaptive, nn.AdaptiveAvgPool2d: _adaptive, nn.AdaptiveAvgPool3d: _adaptive,
    nn.AdaptiveMaxPool1d: _adaptive, nn.AdaptiveMaxPool2d: _adaptive, nn.AdaptiveMaxPool3d: _adaptive,
    nn.Flatten: _flatten_module,
    nn.Embedding: _embedding,
    nn.MultiheadAttention: _mha,
    nn.Dropout1d: _channels_checked(lambda m: None),
    nn.Dropout2d: _channels_checked(lambda m: None),
    nn.Dropout3d: _channels_checked(lambda m: None),
    **{cls: (lambda m, x, *a, **k: _same(x)) for cls in _SAME_MODULES},
}


# ----------------------------------------------------------------------------- functions
def broadcast_shapes(*shapes) -> torch.Size:
    """NumPy broadcasting (torch.broadcast_shapes imports sympy through torch._refs)."""
    nd = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(nd):
        sizes = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0} - {1}
        if len(sizes) > 1:
            raise NoRule("shapes do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return torch.Size(out)


def _broadcast(op: Callable) -> Callable:
    """Elementwise binary op: broadcast shapes, torch's type promotion (decided on
    0-dim tensors, so Python scalars promote as they would)."""

    def rule(a: Any, b: Any, *rest: Any, **kwargs: Any) -> Any:
        if not isinstance(a, Shaped) and not isinstance(b, Shaped):
            return op(a, b, *rest, **kwargs)
        shapes = [x.shape for x in (a, b) if isinstance(x, Shaped)]
        shape = broadcast_shapes(*shapes)
        probe = [torch.empty((), dtype=x.dtype) if isinstance(x, Shaped) else x for x in (a, b)]
        if not all(isinstance(p, (torch.Tensor, int, float, bool)) for p in probe):
            raise NoRule("operand")
        return Shaped(shape, torch.result_type(*probe))

    return rule


def _f_linear(x: Any, weight: Any, bias: Any = None) -> Shaped:
    x, w = _t(x), _t(weight)
    if w.dim() != 2 or not x.shape or x.shape[-1] != w.shape[1]:
        raise NoRule("linear")
    return Shaped(x.shape[:-1] + (w.shape[0],), x.dtype)


def _reshape(x: Any, *shape: Any) -> Shaped:
    x = _t(x)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not all(isinstance(s, int) for s in shape):
        raise NoRule("shape")
    numel = math.prod(x.shape)
    if shape.count(-1) > 1:
        raise NoRule("two -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or numel % known:
            raise NoRule("-1")
        shape = tuple(numel // known if s == -1 else s for s in shape)
    if math.prod(shape) != numel:
        raise NoRule("numel")
    return Shaped(shape, x.dtype)


def _flatten_fn(x: Any, start_dim: int = 0, end_dim: int = -1) -> Shaped:
    x = _t(x)
    return Shaped(_flatten_shape(x.shape, start_dim, end_dim), x.dtype)


def _permute(x: Any, *dims: Any) -> Shaped:
    x = _t(x)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    nd = x.dim()
    dims = tuple(_dim(d, nd) for d in dims)
    if sorted(dims) != list(range(nd)):
        raise NoRule("permutation")
    return Shaped([x.shape[d] for d in dims], x.dtype)


def _transpose(x: Any, d0: int, d1: int) -> Shaped:
    x = _t(x)
    nd = x.dim()
    d0, d1 = _dim(d0, nd), _dim(d1, nd)
    shape = list(x.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    return Shaped(shape, x.dtype)


def _unsqueeze(x: Any, dim: int) -> Shaped:
    x = _t(x)
    d = _dim(dim, x.dim() + 1)
    return Shaped(x.shape[:d] + (1,) + x.shape[d:], x.dtype)


def _squeeze(x: Any, dim: Any = None) -> Shaped:
    x = _t(x)
    if dim is None:
        return Shaped([s for s in x.shape if s != 1], x.dtype)
    dims = {_dim(d, x.dim()) for d in _tuple(dim, 1)}
    return Shaped([s for i, s in enumerate(x.shape) if not (i in dims and s == 1)], x.dtype)


def _size(x: Any, dim: Any = None) -> Any:
    x = _t(x)
    return x.shape if dim is None else x.shape[_dim(dim, x.dim())]


def _to(x: Any, *args: Any, **kwargs: Any) -> Shaped:
    x = _t(x)
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, Shaped):
            dtype = a.dtype
        elif not isinstance(a, (str, torch.device)):
            raise NoRule("to")
    return Shaped(x.shape, dtype or x.dtype)


def _cast(dtype: torch.dtype) -> Callable:
    return lambda x, *a, **k: Shaped(_t(x).shape, dtype)


def _matmul(a: Any, b: Any) -> Shaped:
    a, b = _t(a), _t(b)
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise NoRule("matmul")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return Shaped(batch + (a.shape[-2], b.shape[-1]), a.dtype)


def _reduce(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Shaped:
    x = _t(x)
    if dim is None:
        return Shaped([1] * x.dim() if keepdim else [], dtype or x.dtype)
    dims = {_dim(d, x.dim()) for d in _tuple(dim, 1)}
    shape = [1 if i in dims else s for i, s in enumerate(x.shape) if keepdim or i not in dims]
    return Shaped(shape, dtype or x.dtype)


def _cat(tensors: Any, dim: int = 0) -> Shaped:
    ts = [_t(t) for t in tensors]
    nd = ts[0].dim()
    d = _dim(dim, nd)
    for t in ts:
        if t.dim() != nd or any(t.shape[i] != ts[0].shape[i] for i in range(nd) if i != d):
            raise NoRule("cat")
    shape = list(ts[0].shape)
    shape[d] = sum(t.shape[d] for t in ts)
    return Shaped(shape, ts[0].dtype)


def _pieces(x: Shaped, sizes: list[int], dim: int) -> tuple:
    d = _dim(dim, x.dim())
    out = []
    for s in sizes:
        shape = list(x.shape)
        shape[d] = s
        out.append(Shaped(shape, x.dtype))
    return tuple(out)


def _chunk(x: Any, chunks: int, dim: int = 0) -> tuple:
    x = _t(x)
    n = x.shape[_dim(dim, x.dim())]
    step = -(-n // chunks)
    sizes = [min(step, n - i) for i in range(0, n, step)] if n else [0]
    return _pieces(x, sizes, dim)


def _split(x: Any, split_size: Any, dim: int = 0) -> tuple:
    x = _t(x)
    n = x.shape[_dim(dim, x.dim())]
    if isinstance(split_size, int):
        sizes = [min(split_size, n - i) for i in range(0, n, split_size)]
    else:
        sizes = list(split_size)
        if sum(sizes) != n:
            raise NoRule("split sizes")
    return _pieces(x, sizes, dim)


def _sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Shaped:
    q, k, v = _t(q), _t(k), _t(v)
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or kwargs.get("enable_gqa"):
        raise NoRule("attention")
    return Shaped(q.shape[:-1] + v.shape[-1:], q.dtype)


def _getitem(obj: Any, index: Any) -> Any:
    if not isinstance(obj, Shaped):
        return operator.getitem(obj, index)
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        fill = obj.dim() - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1 :]
    shape, d = [], 0
    for i in idx:
        if i is None:
            shape.append(1)
        elif isinstance(i, int):
            if d >= obj.dim() or not -obj.shape[d] <= i < obj.shape[d]:
                raise NoRule("index")
            d += 1
        elif isinstance(i, slice):
            if d >= obj.dim() or not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
                raise NoRule("slice")
            shape.append(len(range(*i.indices(obj.shape[d]))))
            d += 1
        else:
            raise NoRule("advanced indexing")
    return Shaped(shape + list(obj.shape[d:]), obj.dtype)


_UNARY = (
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh",
    "hardtanh", "hardsigmoid", "hardswish", "softplus", "softsign", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "sin", "cos",
    "erf", "square", "clamp", "clamp_min", "clamp_max", "reciprocal", "dropout", "softmax", "log_softmax",
    "contiguous", "clone", "detach", "layer_norm", "batch_norm", "group_norm", "rms_norm",
)
FUNCTION_RULES: dict[str, Callable] = {
    **{name: _same for name in _UNARY},
    "add": _broadcast(operator.add), "sub": _broadcast(operator.sub), "mul": _broadcast(operator.mul),
    "div": _broadcast(operator.truediv), "pow": _broadcast(operator.pow),
    "floor_divide": _broadcast(operator.floordiv), "maximum": _broadcast(max), "minimum": _broadcast(min),
    "linear": _f_linear,
    "view": _reshape, "reshape": _reshape, "flatten": _flatten_fn, "permute": _permute,
    "transpose": _transpose, "t": lambda a: _transpose(a, 0, 1) if _t(a).dim() == 2 else _same(a), "unsqueeze": _unsqueeze, "squeeze": _squeeze, "size": _size,
    "to": _to, "float": _cast(torch.float32), "double": _cast(torch.float64), "half": _cast(torch.float16),
    "bfloat16": _cast(torch.bfloat16),
    "matmul": _matmul, "mean": _reduce, "sum": _reduce,
    "cat": _cat, "chunk": _chunk, "split": _split,
    "scaled_dot_product_attention": _sdpa, "getitem": _getitem,
    "dim": lambda x: _t(x).dim(),
}
#: Tensor methods whose names mean something else as free functions.
_METHOD_ONLY = {"float", "double", "half", "bfloat16", "size", "dim", "to", "contiguous", "view"}


def _function_rule(name: str, kind: str) -> Callable | None:
    from gradaudit.frontends.fx import normalise_name

    if kind == "call_function" and name in _METHOD_ONLY:
        return None
    return FUNCTION_RULES.get(name) or FUNCTION_RULES.get(normalise_name(name))


def infer(gm: fx.GraphModule, example_inputs: list) -> None:
    """Write ``meta["val"]`` (a :class:`Shaped` or Python value) on every node; raise
    :class:`NoRule` when some op needs the fake-tensor pass."""
    modules = dict(gm.named_modules())
    env: dict[str, Any] = {}
    inputs = iter(example_inputs)
    for n in gm.graph.nodes:
        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if n.op == "placeholder":
            try:
                v = next(inputs)
            except StopIteration as exc:
                raise NoRule("missing input") from exc
            val = map_tensors(v, lambda t: Shaped(t.shape, t.dtype))
        elif n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            val = Shaped(obj.shape, obj.dtype) if isinstance(obj, torch.Tensor) else obj
        elif n.op == "call_module":
            mod = modules[str(n.target)]
            rule = MODULE_RULES.get(type(mod))
            if rule is None:
                raise NoRule(f"module {type(mod).__name__}")
            val = rule(mod, *args, **kwargs)
        elif n.op in ("call_function", "call_method"):
            target = n.target
            if n.op == "call_function" and target is getattr:
                obj, attr = args[0], args[1]
                if isinstance(obj, Shaped) and attr in ("shape", "dtype"):
                    val = getattr(obj, attr)
                else:
                    raise NoRule("getattr")
            else:
                name = target if isinstance(target, str) else getattr(target, "__name__", "")
                if n.op == "call_function" and target is operator.getitem:
                    name = "getitem"
                rule = _function_rule(name, n.op)
                if rule is None:
                    raise NoRule(f"op {name}")
                if name in ("relu_", "sigmoid_") or kwargs.get("inplace"):
                    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
                val = rule(*args, **kwargs)
        elif n.op == "output":
            continue
        else:
            raise NoRule(n.op)
        n.meta["val"] = val
        env[n.name] = val


__all__ = ["infer", "NoRule", "Shaped"]
