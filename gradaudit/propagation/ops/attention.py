"""Softmax and attention: ``softmax`` / ``log_softmax``, ``F.scaled_dot_product_attention``
and ``nn.MultiheadAttention``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from gradaudit.frontends.aten import plain_mask
from gradaudit.frontends.patterns import RELAYOUT, parameter_node
from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import SAMPLER_SEED, Ctx, Effect, Unhandled, handles, make_stats
from gradaudit.propagation.ops.dense import dense_stats


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
    gen = torch.Generator().manual_seed(SAMPLER_SEED)
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

    Over the channel axis of a row whose spread is tracked
    (:mod:`gradaudit.propagation.rows`), the logits are drawn with that spread instead:
    a part shared by the whole row changes nothing (n / (n - 1) turns the spread around
    the row's own mean back into the variance of n iid draws). The softmax's backward
    then sums to zero along the row (dm = E[g^2]); so does LogSoftmax's, g - p sum g,
    only when sum g = 0, which a cotangent independent of the values is not.
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    meta = ctx.meta(ref)
    dim = ctx.arg(1, "dim", None) if ctx.node.kind != "call_module" else ctx.attr("dim")
    if dim is None:
        dim = -1
    n = meta.shape[dim]
    mean, var = (x.mean, x.var) if ctx.node.op != "softmin" else (-x.mean, x.var)
    over_rows = x.axis is not None and x.axis == dim % len(meta.shape)
    spread = x.spread() if over_rows and n > 1 else None
    if spread is not None:
        mean, var = 0.0, spread * n / (n - 1)
    if ctx.node.op == "log_softmax":
        ls = _log_softmax_sample(round(mean, 9), round(var, 9), n)
        return Effect([make_stats(ls[0], ls[1])], [(ref.name, 0, 0, ls[2])])
    masked = _added_constant(ctx, ref, dim % len(meta.shape), n) if spread is None and ctx.node.op == "softmax" else None
    st = _masked_softmax_sample(masked[0].mean, masked[0].var, masked[1]) if masked is not None else _softmax_sample(mean, var, n)
    gain = st["jac"] / n
    return Effect([make_stats(st["p_mean"], st["p_m2"])], [(ref.name, 0, 0, channels.RowSumZero(gain) if over_rows else gain)])


def _added_constant(ctx: Ctx, ref: Ref, dim: int, n: int) -> tuple[Stats, torch.Tensor] | None:
    """(statistics of the random logits, rows of the constant added to them) when the
    softmax reads ``a + mask`` (through layout ops) with ``mask`` a constant holding a
    row of n entries per key (Swin's shifted-window mask of 0 and -100 entries, an
    additive -inf mask), and the softmax runs over the last axis. Broadcasting repeats
    every row of the constant equally often, so its rows are the distribution the
    logits' rows are shifted by. None otherwise."""
    graph = ctx.engine.graph
    if dim != len(ctx.meta(ref).shape) - 1:
        return None
    node = graph[ref.name]
    while node.op in RELAYOUT and node.args and isinstance(node.args[0], Ref):
        node = graph[node.args[0].name]
    if node.op != "add" or len(node.args) < 2:
        return None
    for const_ref, other in ((node.args[1], node.args[0]), (node.args[0], node.args[1])):
        source = parameter_node(graph, const_ref, RELAYOUT)
        value = None if source is None else source.params.get("value")
        if value is None or value.requires_grad or not value.is_floating_point() or not isinstance(other, Ref):
            continue
        if value.dim() == 0 or value.shape[-1] != n:
            continue
        stats = ctx.engine.leaf_stats(other.name)
        return (stats, value.detach().double().reshape(-1, n)) if stats is not None else None
    return None


def _masked_softmax_sample(mean: float, var: float, offsets: torch.Tensor) -> dict[str, float]:
    """:func:`_softmax_sample` for logits s_j = a_j + m_j: a_j ~ N(mean, var) iid, m a row
    of the constant ``offsets`` (rows x n) drawn uniformly. A key whose offset is far
    below the others' (-100, -inf) takes no probability: each query attends to its own
    region only, so p is concentrated on fewer keys (E[sum p^2] larger) than the
    additive constant's variance, taken as random logit spread, would make it (that
    predicts near one-hot rows). Rows whose offsets are all -inf are left out."""
    gen = torch.Generator().manual_seed(SAMPLER_SEED)
    rows_in, n = offsets.shape
    rows = max(4096 // max(n, 1), 64, min(rows_in, 4096))
    pick = offsets[torch.randint(0, rows_in, (rows,), generator=gen)] if rows != rows_in else offsets
    pick = pick[torch.isfinite(pick).any(-1)]
    s = mean + math.sqrt(max(var, 0.0)) * torch.randn(pick.shape, generator=gen, dtype=torch.float64) + pick
    p = torch.softmax(s, dim=-1)
    p2 = p.pow(2).sum(-1)
    jac = (p.pow(2) * (1 - 2 * p + p2.unsqueeze(-1))).sum(-1)
    return {"p2": float(p2.mean()), "p_mean": float(p.mean()), "p_m2": float(p.pow(2).mean()), "jac": float(jac.mean())}


@lru_cache(maxsize=128)
def _log_softmax_sample(mean: float, var: float, n: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(SAMPLER_SEED)
    rows = max(4096 // max(n, 1), 64)
    s = mean + math.sqrt(max(var, 0.0)) * torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y = torch.log_softmax(s, dim=-1)
    p = y.exp()
    gain = 1 - 2 * p.mean() + p.pow(2).sum(-1).mean()
    return float(y.mean()), float(y.pow(2).mean()), float(gain)


@dataclass
class _Heads:
    """Per-channel statistics of q, k, v along the head dimension (vectors over the
    model's channels, split into ``heads`` contiguous groups), with the coherent
    covariance of k and v along the token axis."""

    m2_q: torch.Tensor
    mean_v: torch.Tensor
    var_v: torch.Tensor
    cov_v: torch.Tensor
    fluct_k: torch.Tensor
    heads: int


def _token_coherence(s: Stats, axis: int | None, n: int, token_axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, var, coherent covariance along ``token_axis``) over n channels."""
    base = s if axis is not None else s.scalar()
    mean, var = base.channels(axis if axis is not None else 0, n)
    if s.pos is not None and token_axis in s.pos:
        cov = base.coherent(axis, n) if axis is not None else torch.full((n,), base.cov, dtype=torch.float64)
    else:
        cov = torch.zeros(n, dtype=torch.float64)
    return mean, var, cov.maximum(-var).minimum(var)


def attention_core(h: _Heads, scale: float, n_q: int, n_k: int, causal: bool, dropout_p: float = 0.0,
                   bias_var: float = 0.0) -> dict[str, Any]:
    """Scaled dot-product attention softmax(s q k^T) v at initialisation (Vaswani 2017),
    per channel of the head dimension.

    An additive bias b on the logits (an attention mask's kept entries: T5's relative
    position bias), independent of q and k, adds its variance ``bias_var`` to the
    logits' along a row. Its gradient is the logits': E[dl^2] per logit (below).

    Logits vary along a row (over keys t) only through k's part that differs between
    tokens: k_t = mu_k + a + e_t with a shared by the sample's tokens (variance s_k) and
    e its own (f_k = v_k - s_k); the shared part shifts a whole row, which softmax
    ignores. So the effective logit variance is s^2 sum_c E[q_c^2] f_k,c (per head).
    With P the attention matrix and p2 = E[sum_t P_st^2] (:func:`_softmax_sample`):

        o_s = mu_v + a_v + sum_t P_st e_t:   E[o^2] = mu_v^2 + s_v + p2 f_v
        Cov(o_s, o_s') = s_v + f_v / n_k     (two queries: rows independent, mean 1/n_k)

    Backward, with the output gradient's E[g^2] = g, same-sample covariance s, cross
    x, and E[P_st P_s't] = 1/n_k^2 for two rows, E[P_st P_st'] = (1 - p2) / (n_k (n_k - 1)):

        g_v = (n_q p2 / n_k) g + n_q (n_q - 1) / n_k^2 s
        s_v = n_q (1 - p2) / (n_k (n_k - 1)) g + n_q (n_q - 1) / n_k^2 s,   x_v = (n_q / n_k)^2 x

    so a gradient shared by the queries reaches v whole. dL/dP_st = g_s . v_t sees only
    v's token-specific part (the rest is constant along the row and the softmax
    Jacobian, whose rows sum to 0, removes it): E[dl^2] = jac / n_k sum_c g_c f_v,c per
    logit, and

        g_q,c' = s^2 jac f_k,c' sum_c g_c f_v,c,   g_k,c' = s^2 jac (n_q / n_k) E[q_c'^2] sum_c g_c f_v,c

    (per head; k's shared part drops out of dq because sum_t dl_st = 0). Dropout on P
    scales p2 and dL/dP by 1 / (1 - p).
    """
    keep = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    c = h.m2_q.numel()
    per = c // h.heads
    f_v = (h.var_v - h.cov_v).clamp_min(0.0)
    logit_var = scale**2 * float((h.m2_q * h.fluct_k).reshape(h.heads, per).sum(1).mean()) + bias_var
    st = _softmax_sample(0.0, logit_var, n_k, causal_rows=n_q if causal else 0)
    p2 = st["p2"] * keep
    out_m2 = h.mean_v**2 + h.cov_v + p2 * f_v
    out_cov = h.cov_v + f_v / n_k
    pair = n_q * (n_q - 1) / n_k**2
    tri_v = torch.tensor(
        [[n_q * p2 / n_k, pair, 0.0], [n_q * (1 - st["p2"]) / (n_k * max(n_k - 1, 1)), pair, 0.0], [0.0, 0.0, (n_q / n_k) ** 2]],
        dtype=torch.float64,
    )
    blocks_q, blocks_k = [], []
    for i in range(h.heads):
        sl = slice(i * per, (i + 1) * per)
        base = scale**2 * st["jac"] * keep
        blocks_q.append(base * torch.outer(f_v[sl], h.fluct_k[sl]))
        blocks_k.append(base * (n_q / n_k) * torch.outer(f_v[sl], h.m2_q[sl]))
    return {
        "logit_var": logit_var,
        "logit_std": math.sqrt(max(logit_var, 0.0)),
        "out_mean": h.mean_v,
        "out_m2": out_m2,
        "out_cov": out_cov,
        "tri_v": tri_v,
        "mat_q": torch.block_diag(*blocks_q),
        "mat_k": torch.block_diag(*blocks_k),
        # E[dl^2] per logit over the output gradient's mean g: jac keep / n_k sum_c f_v,c
        # per head (the head's channels), averaged over the heads
        "logit_gain": float(st["jac"] * keep / n_k * f_v.reshape(h.heads, per).sum(1).mean()),
        "p2": st["p2"],
        "entropy_ratio": st["p2"] * n_k,
    }


_ONLY_TOTAL = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def _public(st: dict) -> dict:
    """The attention summary rules read (no tensors)."""
    return {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}


@handles("scaled_dot_product_attention")
def sdpa(ctx: Ctx) -> Effect:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale):
    :func:`attention_core` over the head dimension (the last axis), tokens on the axis
    before it. An ``attn_mask`` that is an activation -- an additive bias, alone or
    under a full or causal pattern of mask fills (:func:`_bias_mask`) -- adds its
    variance to the logits and receives their gradient; a constant mask that is all-true
    or causal arrives as ``attn_mask=None`` / ``is_causal`` from the frontend, and any
    other constant mask is estimated."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mq, mk, mv = ctx.meta(q), ctx.meta(k), ctx.meta(v)
    d = mq.shape[-1]
    scale = ctx.arg(6, "scale", None)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    causal = bool(ctx.arg(5, "is_causal", False))
    mask = ctx.arg(3, "attn_mask")
    bias = _bias_mask(ctx, mask, mq.shape[-2], mk.shape[-2]) if mask is not None else None
    if bias is not None:
        causal = causal or bias[0]
    dropout_p = float(ctx.arg(4, "dropout_p", 0.0) or 0.0)
    sq, sk, sv = ctx.stat(q), ctx.stat(k), ctx.stat(v)
    dv = mv.shape[-1]
    ax = lambda s, m: len(m.shape) - 1 if s.has_channels and s.axis == len(m.shape) - 1 else None  # noqa: E731
    mean_q, var_q, _ = _token_coherence(sq, ax(sq, mq), d, len(mq.shape) - 2)
    _, var_k, cov_k = _token_coherence(sk, ax(sk, mk), d, len(mk.shape) - 2)
    mean_v, var_v, cov_v = _token_coherence(sv, ax(sv, mv), dv, len(mv.shape) - 2)
    h = _Heads(mean_q**2 + var_q, mean_v, var_v, cov_v, (var_k - cov_k).clamp_min(0.0), 1)
    if dv != d:
        raise Unhandled("value head size differs from the query's")
    st = attention_core(h, scale, mq.shape[-2], mk.shape[-2], causal, dropout_p, bias[1] if bias is not None else 0.0)
    pos = (len(ctx.out_meta.shape) - 2,)
    out_axis = len(ctx.out_meta.shape) - 1 if ax(sv, mv) is not None else None
    if out_axis is not None:
        out = Stats.per_channel(out_axis, st["out_mean"], st["out_m2"], st["out_cov"], pos)
    else:
        out = make_stats(float(st["out_mean"].mean()), float(st["out_m2"].mean()), pos, float(st["out_cov"].mean()))
    gains = [
        (q.name, 0, 0, _head_gain(_ONLY_TOTAL, st["mat_q"], ax(sq, mq))),
        (k.name, 0, 0, _keys(_head_gain(_ONLY_TOTAL, st["mat_k"], ax(sk, mk)), causal)),
        (v.name, 0, 0, _keys(channels.Tri(st["tri_v"], axis=ax(sv, mv)) if ax(sv, mv) is not None else channels.Tri(st["tri_v"]), causal)),
    ]
    if bias is not None:  # the bias collects the logits' gradient, once per logit it is broadcast to
        logits = math.prod(mq.shape[:-1]) * mk.shape[-2]
        gains.append((mask.name, 0, 0, channels.Tri(_ONLY_TOTAL, st["logit_gain"] * logits / ctx.meta(mask).numel)))
    return Effect([out], gains, info={"attention": _public(st), "scale": scale, "head_dim": d})


def _bias_mask(ctx: Ctx, mask: Any, n_q: int, n_k: int) -> tuple[bool, float]:
    """(causal, the bias's variance) of an additive attention mask that is an activation
    (T5's relative position bias, trained through the attention): the bias itself, or
    the bias where a constant pattern allows and a mask fill elsewhere
    (:mod:`~gradaudit.propagation.ops.select`: its statistics are the kept entries'),
    through layout ops. The pattern must be the same for every sample and head, and
    full or causal; a constant mask that is neither is not modelled."""
    if not isinstance(mask, Ref) or ctx.const(mask) is not None:
        raise Unhandled("explicit attention mask")
    stats = ctx.stat(mask).scalar()
    if not (math.isfinite(stats.var) and math.isfinite(stats.mean)):
        raise Unhandled("an attention mask without finite moments")
    graph = ctx.engine.graph
    node = graph[mask.name]
    while node.op in RELAYOUT and node.args and isinstance(node.args[0], Ref):
        node = graph[node.args[0].name]
    effect = ctx.engine.effects.get(node.name) if node.op == "where" else None
    filled = effect.info.get("mask_fill") if effect is not None else None
    if filled is None:
        return False, stats.var
    cond = ctx.const(node.args[0]).bool()
    allowed = cond if filled == 2 else ~cond
    rows = torch.broadcast_to(allowed, (*allowed.shape[:-2], n_q, n_k)).reshape(-1, n_q, n_k)
    if not bool((rows == rows[:1]).all()):
        raise Unhandled("an attention mask that differs between samples or heads")
    kind = plain_mask(rows[0])  # what the frontend says as attn_mask=None / is_causal=True
    if kind is None:
        raise Unhandled("an attention mask that is neither full nor causal")
    return kind == "causal", stats.var


def _keys(gain: Any, causal: bool) -> Any:
    """The gain into keys or values: each key collects the gradient of every query that
    reads it, so whatever profile the queries' gradient had over positions (a class
    token's head reads one query), the keys' is flat. Under a causal mask key t is read
    by the queries after it only: the profile is left as it was (unresolved)."""
    return gain if causal else channels.Flat(gain)


def _head_gain(tri: torch.Tensor, mat: torch.Tensor, axis: int | None) -> Any:
    """A q/k gain over the head channels, or its scalar sum when channels are not tracked
    (each input channel then collects the row sums of ``mat``, averaged)."""
    if axis is not None:
        return channels.Tri(tri, axis=axis, mat=mat)
    return channels.Tri(tri, float(mat.sum(0).mean()))


@handles("multihead_attention")
def multihead_attention(ctx: Ctx) -> Effect:
    """nn.MultiheadAttention: in-projections, per-head SDPA with scale 1/sqrt(d_head),
    out-projection. Composes :func:`dense_stats` per channel and :func:`attention_core`; the
    gains chain the projections' squared weights around the core's maps."""
    m = ctx.node.fn
    if not getattr(m, "_qkv_same_embed_dim", True) or m.bias_k is not None:
        raise Unhandled("separate q/k/v projection weights or bias_k")
    if ctx.arg(3, "key_padding_mask") is not None or ctx.arg(5, "attn_mask") is not None:
        raise Unhandled("attention masks")
    causal = bool(ctx.node.kwargs.get("is_causal", False))
    q_ref, k_ref, v_ref = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, heads = m.embed_dim, m.num_heads
    d = e // heads
    w = ctx.param("in_proj_weight").double()
    b = ctx.param("in_proj_bias")
    ws = w.split(e, 0)
    bs = b.double().split(e, 0) if b is not None else (None, None, None)
    seq_dim = 1 if m.batch_first else 0
    feat = len(ctx.meta(q_ref).shape) - 1
    token = (seq_dim,)
    proj = []
    for r, wi, bi in zip((q_ref, k_ref, v_ref), ws, bs):
        s = ctx.stat(r)
        x = s if s.pos == token or s.pos is None else Stats(mean=s.mean, m2=s.m2, axis=s.axis, ch_mean=s.ch_mean, ch_m2=s.ch_m2)
        if x.pos is None:
            x = Stats(mean=x.mean, m2=x.m2, axis=x.axis, ch_mean=x.ch_mean, ch_m2=x.ch_m2, pos=token)
        proj.append(dense_stats(x, feat, wi * wi, wi, bi, feat, pos=token))
    n_q, n_k = ctx.meta(q_ref).shape[seq_dim], ctx.meta(k_ref).shape[seq_dim]
    scale = 1.0 / math.sqrt(d)
    pq, pk, pv = proj
    mean_v, var_v = pv.channels(feat, e)
    _, var_k = pk.channels(feat, e)
    h = _Heads(pq.ch_m2, mean_v, var_v, pv.coherent(feat, e), (var_k - pk.coherent(feat, e)).clamp_min(0.0), heads)
    st = attention_core(h, scale, n_q, n_k, causal, m.dropout)
    attn = Stats.per_channel(feat, st["out_mean"], st["out_m2"], st["out_cov"], token)
    ow, ob = ctx.param("out_proj.weight").double(), ctx.param("out_proj.bias")
    out = dense_stats(attn, feat, ow * ow, ow, ob, feat, pos=token)
    m_o = ow * ow
    w2 = [wi * wi for wi in ws]
    gains = [
        (q_ref.name, 0, 0, channels.Tri(_ONLY_TOTAL, axis=feat, mat=m_o @ st["mat_q"] @ w2[0])),
        (k_ref.name, 0, 0, _keys(channels.Tri(_ONLY_TOTAL, axis=feat, mat=m_o @ st["mat_k"] @ w2[1]), causal)),
        (v_ref.name, 0, 0, _keys(channels.Tri(st["tri_v"], axis=feat, mat=m_o @ w2[2]), causal)),
    ]
    outs: list[Stats | None] = [out]
    if len(ctx.node.outputs) > 1:
        outs.append(make_stats(1.0 / n_k, st["p2"] / n_k) if ctx.node.outputs[1] is not None else None)
    return Effect(outs, gains, info={"attention": _public(st), "scale": scale, "head_dim": d})
