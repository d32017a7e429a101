"""The table of op handlers: forward second moments and backward gradient gains.

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

One module per family of ops: :mod:`.layout` (views, copies, indexing, split, cat, pad),
:mod:`.dense` (linear, convolutions, embedding), :mod:`.experts` (a mixture of experts' grouped product), :mod:`.norms`, :mod:`.dropout`,
:mod:`.pooling`, :mod:`.reductions` (mean, sum), :mod:`.select` (where under a constant
mask), :mod:`.arithmetic` (add, mul, matmul, einsum), :mod:`.attention` (softmax, attention), :mod:`.linear_maps` (interpolation,
pixel shuffle), :mod:`.windows` (torchvision's Swin window attention and patch merging)
and :mod:`.constants` (fills); the recurrent layers' handlers live with
their recursion in :mod:`gradaudit.propagation.recurrent`. :mod:`.base` holds the table,
what a handler reads (:class:`~.base.Ctx`) and what it returns (:class:`~.base.Effect`).
Importing any of them fills the whole table.
"""

from gradaudit.propagation import recurrent  # noqa: F401  (its handlers join the same table)
from gradaudit.propagation.ops import (  # noqa: F401  (each family registers its handlers in the table)
    arithmetic,
    attention,
    constants,
    dense,
    dropout,
    experts,
    layout,
    linear_maps,
    norms,
    pooling,
    reductions,
    select,
    windows,
)
