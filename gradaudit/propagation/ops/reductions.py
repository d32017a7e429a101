"""``mean`` and ``sum`` over some or all axes."""

from __future__ import annotations

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import Ctx, Effect, handles, make_stats, position_count
from gradaudit.propagation.ops.pooling import pooled_gradient


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
    if x.pos is not None and all(d in x.pos or meta.shape[d] == 1 for d in dims):  # an axis of size 1 reduces nothing
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
    (:func:`pooled_gradient` with k = n). Over the channel axis: independent channels,
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
            p_in = position_count(in_meta, x.pos)
            out_cov = cov if pos is not None else None
            xcov = scale * scale * x.cross(x.axis, mu.numel()) if x.xcov != 0.0 else None
            out = Stats.per_channel(axis, scale * mu, scale * scale * (mu * mu + cov + (var - cov) / n), None if out_cov is None else scale * scale * out_cov, pos, xcov)
            out.positive = x.positive
            return Effect([out], [(ref.name, 0, 0, channels.Tri(pooled_gradient(1.0 / n, n, p_in) * scale * scale))])
        out = Stats.per_channel(axis, scale * mu, scale * scale * (mu * mu + var / n))
        out.positive = x.positive
        return Effect([out], [(ref.name, 0, 0, channels.Diag(scale * scale / n**2))])
    base = x.scalar() if x.has_channels else x
    if kind == "channels":
        _, var = x.channels(x.axis, x.ch_mean.numel())
        v = float(var.mean())
        cov = float(x.coherent(x.axis, var.numel()).mean()) / n if x.pos is not None else 0.0
        out = make_stats(scale * x.mean, scale * scale * (x.mean**2 + v / n), pos, scale * scale * cov)
    elif kind == "positions":
        cov = min(max(base.cov, -base.var), base.var)
        out = make_stats(scale * x.mean, scale * scale * (x.mean**2 + cov + (base.var - cov) / n), pos, scale * scale * cov, scale * scale * base.xcov)
        out.positive = x.positive
        return Effect([out], [(ref.name, 0, 0, channels.Tri(pooled_gradient(1.0 / n, n, position_count(in_meta, x.pos)) * scale * scale))])
    else:
        out = make_stats(scale * x.mean, scale * scale * (x.mean**2 + x.var / n))
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
