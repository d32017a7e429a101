"""Binary arithmetic between tensors: ``add`` / ``sub``, ``mul``, ``matmul`` and ``einsum``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles, make_stats, numel_ratio, position_count
from gradaudit.propagation.ops.select import kept_moments


def _numel_gain(ctx: Ctx, ref: Ref) -> float:
    """Broadcast inputs collect the gradients of all their copies."""
    return numel_ratio(ctx.out_meta, ctx.meta(ref))


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
    p_out = position_count(ctx.out_meta, pos)
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
            if v is None:  # a constant tensor without channel structure: its own moments (of its values, not mask fills)
                v_mean, v_m2 = kept_moments(const)
                mean_v, m2_v = torch.full((c,), v_mean, dtype=torch.float64), torch.full((c,), v_m2, dtype=torch.float64)
                out.append(_Operand(op, mean_v, m2_v, torch.zeros_like(mean_v), m2_v, numel_ratio(ctx.out_meta, ctx.meta(op))))
            else:
                out.append(_Operand(op, v, v * v, torch.zeros_like(v), v * v, numel_ratio(ctx.out_meta, ctx.meta(op)), channelled=True))
            continue
        meta = ctx.meta(op)
        r = numel_ratio(ctx.out_meta, meta)
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
    return make_stats(float(mean), float(m2), pos, float(cov))


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
    xcov = _operand_moment(ctx, a, oa) + c * c * _operand_moment(ctx, b, ob)
    if bool((xcov != 0).any()):
        out.set_cross(xcov)
    # third cumulants of independent terms add (a ReLU's output on the residual path)
    out.set_third(_operand_moment(ctx, a, oa, third=True) + c**3 * _operand_moment(ctx, b, ob, third=True))
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


def _operand_moment(ctx: Ctx, ref: Any, o: _Operand, third: bool = False) -> torch.Tensor:
    """An operand's cross-sample covariance (``Stats.xcov``; ``third``: its third central
    moment) per output channel (0 for constants: the same value in every sample has no
    variance to share). A broadcast operand (a per-sample gate) has no third moment here."""
    zero = torch.zeros_like(o.mean)
    if not isinstance(ref, Ref) or ctx.const(ref) is not None:
        return zero
    s = ctx.stat(ref)
    scalar, vector = (s.k3, s.ch_k3) if third else (s.xcov, s.ch_xcov)
    if scalar == 0.0 and vector is None:
        return zero
    if o.channelled and (not third or o.r == 1):
        return s.third(s.axis, o.mean.numel()) if third else s.cross(s.axis, o.mean.numel())
    if third:
        return zero + (scalar if o.r == 1 else 0.0)
    return zero + (s.scalar().xcov if s.has_channels else s.xcov)


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
    return make_stats(k * a.mean * b.mean, k * a.m2 * b.m2 + k * (k - 1) * a.mean**2 * b.mean**2)


@handles("matmul")
def matmul(ctx: Ctx) -> Effect:
    """a @ b with a (..., n, k) and b (..., k, m): a contraction over k.

    Forward: :func:`_contraction`; backward: :func:`_contraction_effect` (dL/da = dL/dy
    b^T sums m terms: gain(a) = m E[b^2] without broadcasting).

    When a's entries have a mean mu_a (softmax probabilities: 1 / n_keys), coherent parts
    add coherently. Forward, b's rows share cov_b in a sample (the tokens' common part):
    E[y^2] gains k (k - 1) mu_a^2 cov_b. Backward, dL/db[t] = sum_s a[s, t] g[s] over the n
    rows of y: with g's same-sample covariance s (a pooled head makes every token's
    gradient alike) E[(dL/db)^2] = n E[a^2] g + n (n - 1) mu_a^2 s, two rows of b share
    n mu_a^2 g + n (n - 1) mu_a^2 s, two samples n^2 mu_a^2 x (rows of a independent).
    """
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        raise Unhandled("matmul with a constant")
    return _matmul_effect(ctx, a, b)


def _matmul_effect(ctx: Ctx, a: Ref, b: Ref) -> Effect:
    """:func:`matmul`'s effect for a (..., n, k) @ b (..., k, m)."""
    ma, mb = ctx.meta(a), ctx.meta(b)
    if len(ma.shape) < 2 or len(mb.shape) < 2:
        raise Unhandled("matmul with a vector")
    k = ma.shape[-1]
    sa, sb = ctx.stat(a), ctx.stat(b)
    effect = _contraction_effect(ctx, a, b, sa, sb, k)
    n = ma.shape[-2]
    if sa.mean == 0.0 or n < 2 or len(mb.shape) < 2:
        return effect
    # entries of a with a mean (attention probabilities, 1 / n_keys): a part of b shared by
    # its k rows, and a part of dL/dy shared by y's n rows, add up coherently
    ma2 = sa.mean * sa.mean
    cov_b = _row_shared(sb, len(mb.shape) - 2)
    out = effect.out[0]
    out.m2 = out.m2 + k * (k - 1) * ma2 * cov_b
    _query_coherence(ctx, out, sb, mb, ma2, k, n, cov_b)
    g_b = n * sa.m2
    tri = torch.tensor(
        [[g_b, n * (n - 1) * ma2, 0.0], [n * ma2, n * (n - 1) * ma2, 0.0], [0.0, 0.0, n * n * ma2]], dtype=torch.float64
    )
    effect.gains[1] = (b.name, 0, 0, channels.Tri(tri))
    return effect


def _query_coherence(ctx: Ctx, out: Stats, sb: Stats, mb, ma2: float, k: int, n: int, cov_b: float) -> None:
    """The covariance of two outputs of an average over b's rows (attention's
    probabilities times its values), when b's rows are positions (tokens). Two rows of
    one product average the same k rows of b with independent weights of mean mu_a:

        Cov(y_i, y_i') = mu_a^2 (k var_b + k (k - 1) cov_b)

    (var_b / k + cov_b with mu_a = 1 / k: every query sees the same average, as
    scaled_dot_product_attention's ``Cov(o_s, o_s')``); two rows of different products
    (windows of a partitioned image: MaxViT) average different rows of b, k^2 mu_a^2
    cov_b. The output's positions are b's with its queries in place of its keys, and
    two of them fall in one product with probability q = (n - 1) / (P - 1)."""
    nb, no = len(mb.shape), len(ctx.out_meta.shape)
    if sb.pos is None or nb - 2 not in sb.pos:
        return
    pos = tuple(sorted({a + no - nb for a in sb.pos if a != nb - 2} | {no - 2}))
    pos = tuple(a for a in pos if ctx.out_meta.shape[a] > 1)
    p = position_count(ctx.out_meta, pos)
    if p < 2:
        return
    base = sb.scalar() if sb.has_channels else sb
    q = (n - 1) / (p - 1)
    cov = q * ma2 * (k * base.var + k * (k - 1) * cov_b) + (1 - q) * k * k * ma2 * cov_b
    out.pos, out.cov = pos, min(max(cov, -out.var), out.var)


def _row_shared(s: Stats, row_axis: int) -> float:
    """The covariance of two rows of ``s`` (along ``row_axis``) in one sample, when that
    axis is one of its position axes (the tokens of the values an attention averages)."""
    if s.pos is None or row_axis not in s.pos:
        return 0.0
    base = s.scalar() if s.has_channels else s
    return max(min(base.cov, base.var), -base.var)


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
    """Two-operand einsum as a contraction over the summed indices. A batched matrix
    product ``...ij,...jk->...ik`` (attention's probabilities times its values, as
    MaxViT writes it: ``BGHIJ,BGHJD->BGHID``) is :func:`matmul`, whose probabilities
    average the part the values' rows share (a value projection's bias, the tokens'
    common part) coherently."""
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
    if _matmul_form(sa_, sb_, out) and ma.shape[:-2] == mb.shape[:-2]:
        return _matmul_effect(ctx, a, b)
    k = math.prod(sizes[c] for c in sizes if c not in out)
    return _contraction_effect(ctx, a, b, ctx.stat(a), ctx.stat(b), k)


def _matmul_form(a: str, b: str, out: str) -> bool:
    """Whether einsum subscripts ``a,b->out`` are ``...ij,...jk->...ik`` (the same batch
    letters in front, each letter once per operand)."""
    if len(a) < 2 or len(b) < 2 or len(set(a)) != len(a) or len(set(b)) != len(b):
        return False
    batch, (i, j), (j2, k) = a[:-2], a[-2:], b[-2:]
    return b[:-2] == batch and j == j2 and len({i, j, k}) == 3 and not {i, j, k} & set(batch) and out == batch + i + k
