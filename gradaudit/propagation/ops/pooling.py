"""Max and average pooling (adaptive included), per channel."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels, rows
from gradaudit.propagation.moments import gaussian_points, max_of_k_weights
from gradaudit.propagation.ops.base import Ctx, Effect, as_tuple, handles, make_stats, numel_ratio


@lru_cache(maxsize=256)
def _max_of_normals(k: int) -> tuple[float, float]:
    """E[M] and E[M^2] for M the maximum of k iid N(0, 1) (density k phi(z) Phi(z)^(k-1)).
    For N(mu, s^2): E[max] = mu + s E[M], E[max^2] = mu^2 + 2 mu s E[M] + s^2 E[M^2]."""
    z, _ = gaussian_points(0.0, 1.0)
    w = max_of_k_weights(k, channels=False)
    return float((w * z).sum()), float((w * z * z).sum())


def _window(ctx: Ctx, ref: Ref) -> float:
    """Number of input elements per output element of a pooling op."""
    node = ctx.node
    x_meta = ctx.meta(ref)
    y_meta = ctx.out_meta
    if node.op.startswith("adaptive"):
        return max(x_meta.numel / y_meta.numel, 1.0)
    nd = len(x_meta.shape) - 2 if len(x_meta.shape) > 2 else 1
    ks = ctx.attr("kernel_size") if node.kind == "call_module" else ctx.arg(1, "kernel_size")
    return float(math.prod(as_tuple(ks, nd)))


def _pool_channels(ctx: Ctx, ref: Ref) -> tuple[Stats, torch.Tensor, torch.Tensor, torch.Tensor, int, tuple | None]:
    """(stats, mean, var, coherent covariance per channel, channel axis, output position
    axes) of a pooling op's input (channels on axis 1, positions after it)."""
    meta = ctx.meta(ref)
    axis = 1 if len(meta.shape) > 2 else 0
    x = ctx.stat(ref)
    mean, var = x.channels(axis, meta.shape[axis])
    spatial = tuple(range(axis + 1, len(meta.shape)))
    cov = x.coherent(axis, meta.shape[axis]).maximum(-var).minimum(var) if x.pos == spatial else torch.zeros_like(var)
    out_pos = tuple(a for a in spatial if ctx.out_meta.shape[a] > 1) or None
    return x, mean, var, cov, axis, out_pos


def _keep_cross(out: Stats, x: Stats, axis: int, n: int) -> None:
    """A part shared by the whole batch shifts every window alike: a pooled value keeps
    the input's cross-sample covariance (``Stats.xcov``)."""
    if x.xcov != 0.0:
        out.set_cross(x.cross(axis, n) if out.has_channels else x.xcov)


def pooled_gradient(r: float, k: float, p_in: int) -> torch.Tensor:
    """(g, s, x) map of a pooling backward: each input is in r k windows and receives
    dL/dy / k from each (r = numel(out) / numel(in); r k = 1 without overlap). Windows'
    gradients share s, so E[g_in^2] = (r/k) g + (r^2 - r/k) s. Two positions share a
    window with probability q = (k - 1) / (p_in - 1), else they see different windows:
    E[g_i g_j] = q E[g_in^2] + (1 - q) r^2 s. Across samples, r^2 x. A global average
    (k = p_in) makes the gradient identical at every position: s_in = g_in."""
    q = min(max((k - 1) / (p_in - 1), 0.0), 1.0) if p_in > 1 else 1.0
    g_row = [r / k, r * r - r / k, 0.0]
    s_row = [q * g_row[0], q * g_row[1] + (1 - q) * r * r, 0.0]
    return torch.tensor([g_row, s_row, [0.0, 0.0, r * r]], dtype=torch.float64)


@handles("max_pool", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d")
def max_pool(ctx: Ctx) -> Effect:
    """Max over windows of k elements, per channel.

    Forward: when the input is a monotone function f of a Gaussian value (ReLU, ...
    after a conv or norm, or a concatenation along channels of such values, pooled
    piece by piece), max f(z_i) = f(max z_i) is integrated exactly under the
    density of the maximum of k Gaussians, k phi(z) Phi(z)^(k-1); otherwise the k
    inputs are treated as Gaussians with the input's moments. A part shared by all
    positions (variance s) shifts the whole window: max(a + e_i) = a + max e_i.

    Backward: each window routes its gradient to its arg-max, so the summed squared
    gradient is preserved: gain = numel(out) / numel(in) -- but only arg-max elements
    receive it, which the engine accounts for upstream (:class:`channels.AtMax`), also
    through a concatenation along channels of such values (Inception's branches). An
    input is an arg-max with probability r = numel(out) / numel(in), two inputs with
    probability r^2: a coherent gradient part keeps r of its power and r^2 of its
    covariance.
    """
    ref = ctx.first_ref()
    x, mean, var, cov, axis, pos = _pool_channels(ctx, ref)
    k = max(int(round(_window(ctx, ref))), 1)
    exact = ctx.engine.fused_max_moments(ref.name, k)
    if exact is not None:
        out = Stats.per_channel(axis, *exact, cov, pos) if exact[0].dim() else make_stats(float(exact[0]), float(exact[1]), pos, float(cov.mean()))
    else:
        em, em2 = _max_of_normals(k)
        sd = (var - cov).sqrt()
        m = mean + sd * em
        out = Stats.per_channel(axis, m, m * m + cov + (var - cov) * (em2 - em * em), cov, pos)
    out.row_spread = rows.kept_if_equal(x, axis)
    _keep_cross(out, x, axis, ctx.meta(ref).shape[axis])
    r = numel_ratio(ctx.out_meta, ctx.meta(ref))
    at_max = channels.AtMax(r, k, axis=axis)
    return Effect([out], [(ref.name, 0, 0, channels.Split(at_max, channels.Diag(r * r, axis=axis), at_max))])


@handles("avg_pool", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
def avg_pool(ctx: Ctx) -> Effect:
    """Mean over windows of k elements. With a part shared by all positions (variance
    s_c) and the rest independent, E[y_c^2] = mu_c^2 + s_c + (v_c - s_c) / k: a coherent
    part is not averaged away (random-effects model).

    Backward: every input receives dL/dy / k from each window it belongs to:
    gain = numel(out) / (k numel(in)) for independent gradients; coherent parts by
    :func:`pooled_gradient`. Every channel of a position gets its share from the same
    windows, so a gradient whose rows sum to zero keeps doing so
    (:mod:`gradaudit.propagation.rows`).
    """
    ref = ctx.first_ref()
    x, mean, var, cov, axis, pos = _pool_channels(ctx, ref)
    k = _window(ctx, ref)
    in_meta = ctx.meta(ref)
    p_in = in_meta.numel // (in_meta.shape[0] * in_meta.shape[axis]) if len(in_meta.shape) > 2 else 1
    out = Stats.per_channel(axis, mean, mean * mean + cov + (var - cov) / k, cov if pos is not None else None, pos)
    out.row_spread = rows.kept_if_equal(x, axis)
    _keep_cross(out, x, axis, in_meta.shape[axis])
    tri = pooled_gradient(numel_ratio(ctx.out_meta, in_meta), k, p_in)
    return Effect([out], [(ref.name, 0, 0, channels.Tri(tri, axis=axis, rows_kept=True))])
