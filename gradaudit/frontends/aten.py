"""ATen operator names -> the normalised op names and argument layouts of the IR.

``torch.export`` records ATen operators (``aten.linear.default``, ``aten.addmm.default``,
``aten.convolution.default``, ``aten._native_batch_norm_legit_functional.default``...)
where torch.fx records the Python functions the user called (``F.linear``,
``F.batch_norm``). The propagation handlers know one name and one argument layout per
mathematical op, the ``torch.nn.functional`` one; this table maps every ATen spelling
onto it, so no handler is written twice:

- the op name: the overload packet's name through :func:`fx.normalise_name` (``relu_``
  -> ``relu``, ``bmm`` -> ``matmul``), or the name given here (``convolution`` ->
  ``conv2d``, ``_native_batch_norm_legit_functional`` -> ``batch_norm``);
- the arguments: reordered into the functional layout (``aten.embedding(weight, ids)``
  -> ``F.embedding(ids, weight)``, ``aten.batch_norm(x, w, b, mean, var, ...)`` ->
  ``F.batch_norm(x, mean, var, w, b, ...)``);
- the callable kept on the node (for Monte Carlo estimates and fused elementwise chains),
  which takes the arguments in that layout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

#: A converter takes the ATen call's (args, kwargs) and returns (op, fn, args, kwargs).
Converter = Callable[[tuple, dict], tuple[str, Callable, tuple, dict]]


@dataclass(frozen=True)
class Spelling:
    """How one ATen op is written in the IR."""

    op: str
    convert: Converter


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if i < len(args):
        return args[i]
    return kwargs.get(name, default)


def _convolution(args: tuple, kwargs: dict):
    """aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding,
    groups) -> F.convNd(x, w, b, stride, padding, dilation, groups) or
    F.conv_transposeNd(x, w, b, stride, padding, output_padding, groups, dilation)."""
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = (
        _arg(args, kwargs, i, n) for i, n in enumerate(
            ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
        )
    )
    nd = len(stride) if isinstance(stride, (list, tuple)) else 2
    if transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return f"conv_transpose{nd}d", fn, (x, w, b, stride, padding, output_padding, groups, dilation), {}
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return f"conv{nd}d", fn, (x, w, b, stride, padding, dilation, groups), {}


def _batch_norm(args: tuple, kwargs: dict):
    """aten.batch_norm / native_batch_norm / _native_batch_norm_legit(_functional)
    (x, w, b, running_mean, running_var, training, momentum, eps) -> F.batch_norm(x,
    running_mean, running_var, w, b, training, momentum, eps)."""
    names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    x, w, b, rm, rv, training, momentum, eps = (_arg(args, kwargs, i, n) for i, n in enumerate(names))
    return "batch_norm", F.batch_norm, (x, rm, rv, w, b, bool(training), momentum or 0.1, 1e-5 if eps is None else eps), {}


def _batch_norm_no_training(args: tuple, kwargs: dict):
    """_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)."""
    x, w, b, rm, rv, momentum, eps = (list(args) + [None] * 7)[:7]
    return "batch_norm", F.batch_norm, (x, rm, rv, w, b, False, momentum or 0.1, 1e-5 if eps is None else eps), {}


def _layer_norm(args: tuple, kwargs: dict):
    """aten.layer_norm / native_layer_norm(x, shape, w, b, eps) -> F.layer_norm."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    x, shape, w, b, eps = (_arg(args, kwargs, i, n) for i, n in enumerate(names))
    return "layer_norm", F.layer_norm, (x, list(shape), w, b, 1e-5 if eps is None else eps), {}


def _group_norm(args: tuple, kwargs: dict):
    """aten.group_norm(x, groups, w, b, eps) and native_group_norm(x, w, b, N, C, HxW,
    groups, eps) -> F.group_norm(x, groups, w, b, eps)."""
    if len(args) >= 8:  # native_group_norm
        x, w, b, _, _, _, groups, eps = args[:8]
    else:
        x, groups, w, b, eps = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "num_groups", "weight", "bias", "eps")))
    return "group_norm", F.group_norm, (x, groups, w, b, 1e-5 if eps is None else eps), {}


def _instance_norm(args: tuple, kwargs: dict):
    """aten.instance_norm(x, w, b, running_mean, running_var, use_input_stats, momentum,
    eps, cudnn) -> F.instance_norm(x, running_mean, running_var, w, b, use_input_stats,
    momentum, eps)."""
    x, w, b, rm, rv, use, momentum, eps = (list(args) + [None] * 8)[:8]
    return "instance_norm", F.instance_norm, (x, rm, rv, w, b, True if use is None else use, momentum or 0.1, 1e-5 if eps is None else eps), {}


def _embedding(args: tuple, kwargs: dict):
    """aten.embedding(weight, indices, ...) -> F.embedding(indices, weight)."""
    return "embedding", F.embedding, (_arg(args, kwargs, 1, "indices"), _arg(args, kwargs, 0, "weight")), {}


def _addmm(args: tuple, kwargs: dict):
    """aten.addmm(bias, x, m, beta=1, alpha=1) = beta * bias + alpha * x @ m: with m a
    constant (a parameter, or its transpose) this is F.linear(x, m^T, bias); the
    frontend turns ``m`` into that constant when it can, else estimates it."""
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        return "addmm", torch.addmm, args, kwargs
    bias, x, m = args[:3]
    return "linear", F.linear, (x, Transposed(m), bias), {}


def _softmax(args: tuple, kwargs: dict):
    """aten.softmax.int(x, dim, dtype) / _softmax(x, dim, half_to_float) -> F.softmax(x, dim)."""
    return "softmax", F.softmax, (args[0], args[1]), {}


def _log_softmax(args: tuple, kwargs: dict):
    return "log_softmax", F.log_softmax, (args[0], args[1]), {}


def _slice(args: tuple, kwargs: dict):
    """aten.slice.Tensor(x, dim, start, end, step) -> x[:, ..., start:end:step]."""
    x = args[0]
    dim, start, end, step = (_arg(args, kwargs, i, n, d) for i, n, d in ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))
    end = None if isinstance(end, int) and end >= 2**62 else end
    return "getitem", operator.getitem, (x, SliceAt(dim, slice(start, end, step))), {}


def _constant_pad(args: tuple, kwargs: dict):
    """aten.constant_pad_nd(x, pad, value) -> F.pad(x, pad, "constant", value)."""
    return "pad", F.pad, (args[0], list(args[1]), "constant", _arg(args, kwargs, 2, "value", 0.0)), {}


def _dropout(args: tuple, kwargs: dict):
    """aten.dropout / native_dropout(x, p, train) -> F.dropout(x, p, training)."""
    train = _arg(args, kwargs, 2, "train", True)
    return "dropout", F.dropout, (args[0], _arg(args, kwargs, 1, "p", 0.5), True if train is None else bool(train)), {}


def _to(args: tuple, kwargs: dict):
    return "to", _ToCopy(kwargs), (args[0],), {}


class _ToCopy:
    """``x.to(dtype)`` with the ATen call's dtype/device keywords."""

    def __init__(self, kwargs: dict) -> None:
        self.dtype = kwargs.get("dtype")

    def __call__(self, x):
        return x.to(self.dtype) if self.dtype is not None else x.clone()


def _sdpa(args: tuple, kwargs: dict):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    q, k, v, mask, p, causal, scale = (_arg(args, kwargs, i, n) for i, n in enumerate(names))
    kw = {"attn_mask": mask, "dropout_p": p or 0.0, "is_causal": bool(causal), "scale": scale}
    if kwargs.get("enable_gqa"):
        kw["enable_gqa"] = True
    return "scaled_dot_product_attention", F.scaled_dot_product_attention, (q, k, v), kw


@dataclass(frozen=True)
class Transposed:
    """Marks ``addmm``'s matrix: the frontend substitutes the transposed constant."""

    ref: Any


@dataclass(frozen=True)
class SliceAt:
    """A slice on one dimension: the frontend expands it into a getitem index."""

    dim: int
    piece: slice


SPELLINGS: dict[str, Converter] = {
    "convolution": _convolution,
    "_convolution": _convolution,
    "batch_norm": _batch_norm,
    "native_batch_norm": _batch_norm,
    "_native_batch_norm_legit": _batch_norm,
    "_native_batch_norm_legit_functional": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm_no_training,
    "layer_norm": _layer_norm,
    "native_layer_norm": _layer_norm,
    "group_norm": _group_norm,
    "native_group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "embedding": _embedding,
    "addmm": _addmm,
    "softmax": _softmax,
    "_softmax": _softmax,
    "log_softmax": _log_softmax,
    "_log_softmax": _log_softmax,
    "slice": _slice,
    "constant_pad_nd": _constant_pad,
    "dropout": _dropout,
    "native_dropout": _dropout,
    "feature_dropout": lambda a, k: ("feature_dropout", torch.feature_dropout, (a[0], a[1], bool(a[2])), {}),
    "_to_copy": _to,
    "to": lambda a, k: ("to", _ToCopy({"dtype": next((x for x in list(a[1:]) + list(k.values()) if isinstance(x, torch.dtype)), None)}), (a[0],), {}),
    "scaled_dot_product_attention": _sdpa,
    "upsample_nearest2d": lambda a, k: ("upsample_nearest2d", torch.ops.aten.upsample_nearest2d.vec, a, k),
    "upsample_bilinear2d": lambda a, k: ("upsample_bilinear2d", torch.ops.aten.upsample_bilinear2d.vec, a, k),
    "_unsafe_view": lambda a, k: ("view", torch.ops.aten.view.default, a, k),
    "lift_fresh_copy": lambda a, k: ("clone", torch.ops.aten.clone.default, a, k),
    "squeeze": lambda a, k: ("squeeze", torch.squeeze, a, k),
    "max_pool2d_with_indices": lambda a, k: ("max_pool2d", torch.ops.aten.max_pool2d_with_indices.default, a, k),
    "max_pool3d_with_indices": lambda a, k: ("max_pool3d", torch.ops.aten.max_pool3d_with_indices.default, a, k),
    "_adaptive_avg_pool2d": lambda a, k: ("adaptive_avg_pool2d", F.adaptive_avg_pool2d, a, k),
    "_adaptive_avg_pool3d": lambda a, k: ("adaptive_avg_pool3d", F.adaptive_avg_pool3d, a, k),
}

#: Ops that leave nothing to propagate (runtime assertions, metadata checks).
NO_VALUE = frozenset({"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
                      "_functional_assert_async", "_assert_tensor_metadata"})


def plain_mask(mask: torch.Tensor) -> str | None:
    """``"none"`` for an attention mask that allows everything (all true, or an additive
    mask of zeros), ``"causal"`` for the lower-triangular mask of ``is_causal=True``,
    else None (a real mask, or an additive bias)."""
    if mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | ~allowed).all()):
            return None
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        return None
    if bool(allowed.all()):
        return "none"
    if mask.dim() >= 2:
        q, k = mask.shape[-2:]
        if bool((allowed == torch.ones(q, k, dtype=torch.bool).tril()).all()):
            return "causal"
    return None


def spell(target: Any, args: tuple, kwargs: dict) -> tuple[str, Callable, tuple, dict]:
    """(normalised op, callable, args, kwargs) for a call of ATen ``target``."""
    from gradaudit.frontends.fx import normalise_name

    if target is operator.getitem:
        return "getitem", operator.getitem, args, kwargs
    packet = packet_name(target)
    convert = SPELLINGS.get(packet) or SPELLINGS.get(packet.rstrip("_") if not packet.startswith("_") else packet)
    if convert is not None:
        return convert(args, kwargs)
    return normalise_name(packet), out_of_place(target), args, kwargs


def packet_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", str(target))


def out_of_place(target: Any) -> Callable:
    """``aten.relu_.default`` -> ``aten.relu.default``: the IR never overwrites a value."""
    packet = packet_name(target)
    if not packet.endswith("_") or packet.startswith("_") or not hasattr(target, "_overloadname"):
        return target
    base = getattr(torch.ops.aten, packet[:-1], None)
    return getattr(base, target._overloadname, target) if base is not None else target


__all__ = ["plain_mask", "spell", "SPELLINGS", "NO_VALUE", "Transposed", "SliceAt", "packet_name", "out_of_place"]
