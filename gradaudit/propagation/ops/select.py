"""Selection by a mask known ahead of time: ``torch.where(cond, a, b)`` with ``cond`` a
constant (a causal pattern, a padding mask computed from the example's ids).

With p the fraction of the output's elements where ``cond`` holds, an element is a
draw of ``a`` with probability p and of ``b`` otherwise (the mask does not depend on
the values), so

    E[y] = p E[a] + (1 - p) E[b],   E[y^2] = p E[a^2] + (1 - p) E[b^2]

and the gradient reaches ``a`` where the mask holds, ``b`` elsewhere: E[(dL/da)^2] =
r_a p E[(dL/dy)^2], r_a the copies of each element of ``a`` when it is broadcast (its
copies' gradients add up independently; a broadcast over the batch, like a relative
position bias shared by the samples, collects one per sample).

A *mask fill* -- ``b`` (or ``a``) a number at or below -1e30, or -inf: the smallest
float an attention mask puts where a key must not be read -- is not a value: the
output is an additive attention mask whose kept entries are the other branch. Its
statistics are those of the kept entries (mean, second moment): mixing -3.4e38 into
the moments would describe the tensor as 1e38-sized activations, which it is not.
Its gradient, as every gradient, is over all entries: the attention's softmax gives
the filled ones none, so the kept branch collects the whole of it, E[(dL/da)^2] =
r_a E[(dL/dy)^2]. The attention that reads the mask takes the pattern from ``cond``
(:func:`gradaudit.propagation.ops.attention.sdpa`). A constant mask holding fills (0
and float32's smallest number, added to eager attention's scores) is described the
same way, by its entries that are values (:func:`kept_moments`), wherever its moments
are taken: the constant itself and an operand of a sum.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from gradaudit.ir import Ref
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles, make_stats, numel_ratio

#: A fill at or below this is an attention mask's "never read" value, not a number.
MASK_FILL = -1e30


def mask_fill(ctx: Ctx, value: Any) -> bool:
    """Whether ``value`` (a number or a constant) is a mask fill (every entry <= MASK_FILL)."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value) <= MASK_FILL
    const = ctx.const(value) if isinstance(value, (Ref, torch.Tensor)) else None
    return const is not None and const.is_floating_point() and const.numel() > 0 and bool((const <= MASK_FILL).all())


def kept_moments(const: torch.Tensor) -> tuple[float, float]:
    """(mean, second moment) of a constant over its entries that are values, not mask
    fills: an additive attention mask of 0 and float32's smallest number (what
    transformers adds to eager attention's scores) is 0 where a key is read; the
    softmax reads its fills from the constant itself. A constant of fills only: its
    own moments."""
    c = const.detach().double()
    values = c[c > MASK_FILL] if c.is_floating_point() else c
    if values.numel() == 0:
        values = c
    return float(values.mean()), float(values.pow(2).mean())


def kept_fraction(cond: torch.Tensor, shape: tuple[int, ...]) -> float:
    """The fraction of an output of ``shape`` where the broadcast ``cond`` holds."""
    return float(torch.broadcast_to(cond.bool(), shape).double().mean())


def _branch(ctx: Ctx, value: Any) -> tuple[float, float, Ref | None]:
    """(mean, second moment, the Ref a gradient goes to) of one branch."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value), float(value) ** 2, None
    const = ctx.const(value)
    if const is not None:
        return (*kept_moments(const), None)
    if not isinstance(value, Ref):
        raise Unhandled(f"where branch {value!r}")
    s = ctx.stat(value).scalar()
    return s.mean, s.m2, value


@handles("where")
def where(ctx: Ctx) -> Effect:
    """torch.where(cond, a, b) with a constant ``cond``: the mixture of the two branches
    in the proportion of the mask, or, when one branch is a mask fill, the other
    branch's kept entries (see the module)."""
    cond = ctx.const(ctx.arg(0, "condition"))
    if cond is None or cond.dtype != torch.bool:
        raise Unhandled("a condition computed from activations")
    a, b = ctx.arg(1, "input"), ctx.arg(2, "other")
    shape = ctx.out_meta.shape
    p = kept_fraction(cond, shape)
    fills = (mask_fill(ctx, a), mask_fill(ctx, b))
    if fills[0] and fills[1]:
        raise Unhandled("both branches are mask fills")
    if any(fills):
        kept, share = (b, 1.0 - p) if fills[0] else (a, p)
        mean, m2, ref = _branch(ctx, kept)
        if share <= 0.0:
            raise Unhandled("the mask keeps no entry")
        gains = [] if ref is None else [(ref.name, 0, 0, numel_ratio(ctx.out_meta, ctx.meta(ref)))]
        return Effect([make_stats(mean, m2)], gains, info={"mask_fill": 1 if fills[0] else 2})  # the filled branch
    (ma, m2a, ra), (mb, m2b, rb) = _branch(ctx, a), _branch(ctx, b)
    if not all(math.isfinite(v) for v in (ma, m2a, mb, m2b)):
        raise Unhandled("a branch without finite moments")
    gains = [(ref.name, 0, 0, numel_ratio(ctx.out_meta, ctx.meta(ref)) * share)
             for ref, share in ((ra, p), (rb, 1.0 - p)) if ref is not None and share > 0.0]
    return Effect([make_stats(p * ma + (1 - p) * mb, p * m2a + (1 - p) * m2b)], gains)
