"""A mixture of experts' grouped matrix product: every row of the input times the
weight matrix of the expert it was routed to (transformers' ``grouped_mm_fallback``,
``torch._grouped_mm``, ``torch.nn.functional.grouped_mm``)."""

from __future__ import annotations

from typing import Any

import torch

from gradaudit.frontends.patterns import GROUPED_PRODUCTS, constant
from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops import chunked
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles
from gradaudit.propagation.ops.dense import dense_stats

class Mixture:
    """sum_e p_e M_e of (C_out, C_in) matrices (float64 tensors or
    :class:`~gradaudit.propagation.ops.chunked.Chunked`), applied term by term and never
    formed: a Mixtral layer's eight 28,672 x 4,096 experts stay uncopied. Supports what
    a channel matrix does in the backward (:class:`~gradaudit.propagation.channels.Mat`):
    ``@``, ``.t()``, ``.shape``, ``.dtype``."""

    dtype = torch.float64

    def __init__(self, parts: list[tuple[float, Any]]) -> None:
        self.parts = parts

    @property
    def shape(self) -> torch.Size:
        return self.parts[0][1].shape

    def t(self) -> "Mixture":
        return Mixture([(p, m.t()) for p, m in self.parts])

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        total = None
        for p, m in self.parts:
            term = (m @ other.to(m.dtype)).double() * p
            total = term if total is None else total + term
        return total


def routed_fractions(offs: torch.Tensor | None, experts: int, rows: int) -> list[float]:
    """The fraction of the rows each expert gets: from ``offs`` (the cumulative row count
    at each expert's end) when its value is known before the run, else 1 / E each (the
    routing depends on the data; at initialisation a router spreads tokens about evenly)."""
    if offs is None or offs.numel() != experts or rows == 0:
        return [1.0 / experts] * experts
    ends = [min(int(v), rows) for v in offs.tolist()]
    starts = [0] + ends[:-1]
    return [max(end - start, 0) / rows for start, end in zip(starts, ends)]


def _operand(ctx: Ctx, index: int, names: tuple[str, ...]) -> Any:
    """Argument ``index``, or the first of ``names`` given as a keyword (the spellings
    of transformers' op, ATen's and torch.nn.functional's differ)."""
    found = ctx.arg(index, names[0])
    return found if found is not None else next((ctx.node.kwargs[n] for n in names[1:] if n in ctx.node.kwargs), None)


@handles(*sorted(GROUPED_PRODUCTS))
def grouped_mm(ctx: Ctx) -> Effect:
    """y[s] = x[s] W_e(s) for an input x (S, K), expert weights W (E, K, N) and the rows
    of each expert given by ``offs``: a Linear layer per expert (He et al. 2015, as
    :func:`~gradaudit.propagation.ops.dense.dense_stats`), mixed by the fraction p_e of
    rows routed to each (Shazeer et al. 2017; Fedus et al. 2022):

        E[y_n]   = sum_e p_e (A_e mu)_n
        E[y_n^2] = sum_e p_e [(A_e^2 v)_n + (A_e mu)_n^2],      A_e = W_e^T (N x K)

    Backward: dL/dx[s] = A_e(s)^T dL/dy[s], so E[(dL/dx_k)^2] = sum_e p_e sum_n
    A_e[n, k]^2 E[(dL/dy_n)^2].

    The rows routed to an expert are assumed to be a sample of all rows, in value and in
    gradient (the router depends on the input, but at initialisation it spreads tokens
    about evenly and without regard to their size); the fractions come from ``offs`` when
    its value is known ahead of the run, else 1 / E. The rows are tokens sorted by
    expert: a part they share is not tracked through the product.
    """
    x_ref, w_ref = _operand(ctx, 0, ("input", "self", "mat_a")), _operand(ctx, 1, ("weight", "mat2", "mat_b"))
    if not isinstance(x_ref, Ref) or not isinstance(w_ref, Ref):
        raise Unhandled("grouped matmul without a tensor input and weight")
    if ctx.arg(3, "bias") is not None:
        raise Unhandled("grouped matmul with a bias")
    weight = constant(ctx.engine.graph, w_ref)
    if weight is None or weight.dim() != 3:
        raise Unhandled("grouped matmul whose weight is not a stack of expert matrices from parameters")
    x_meta = ctx.meta(x_ref)
    if len(x_meta.shape) != 2 or x_meta.shape[1] != weight.shape[1]:
        raise Unhandled("grouped matmul of an input that is not (rows, features)")
    offs = ctx.arg(2, "offs")
    known = constant(ctx.engine.graph, offs) if isinstance(offs, Ref) else offs if isinstance(offs, torch.Tensor) else None
    fractions = routed_fractions(known, weight.shape[0], x_meta.shape[0])
    x = ctx.stat(x_ref)
    reuse = getattr(ctx.engine, "reuse", None)
    mean = m2 = None
    backward = []
    for e, p in enumerate(fractions):
        if p == 0.0:
            continue
        w, w2 = chunked.weights(weight[e].t(), reuse)  # A_e = W_e^T, (N, K)
        s = dense_stats(x, 1, w2, w, None, 1)
        mean = s.ch_mean * p if mean is None else mean + s.ch_mean * p
        m2 = s.ch_m2 * p if m2 is None else m2 + s.ch_m2 * p
        backward.append((p, w2))
    if mean is None:
        raise Unhandled("grouped matmul that routes no rows")
    out = Stats.per_channel(1, mean, m2)
    return Effect([out], [(x_ref.name, 0, 0, channels.Mat(Mixture(backward), axis=1))])
