"""Tensors filled with a constant: ``zeros_like``, ``ones_like``, ``full_like`` and the
``new_zeros`` / ``new_ones`` / ``new_full`` methods (a recurrent loop's initial state,
``h = x.new_zeros(batch, hidden)``).

Every element equals the fill value c, so E[y] = c and E[y^2] = c^2 exactly; the inputs
only give a shape or a dtype, so no gradient flows back to them.
"""

from __future__ import annotations

from numbers import Real

from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles, make_stats

#: Position of ``fill_value`` in the call's arguments, per op (zeros and ones have none).
_FILL_AT = {"full_like": 1, "new_full": 2}


@handles("zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full")
def constant(ctx: Ctx) -> Effect:
    """Fill value c: mean c, second moment c^2, no gradient to the inputs."""
    op = ctx.node.op
    if "zeros" in op:
        c = 0.0
    elif "ones" in op:
        c = 1.0
    else:
        c = ctx.arg(_FILL_AT[op], "fill_value")
        if not isinstance(c, Real):
            raise Unhandled("a fill value that is not a number")
    return Effect([make_stats(float(c), float(c) ** 2)], [])
