"""Normalisation layers: batch, layer (and RMS), group and instance norm."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.moments import eps_leak, inverse_moment
from gradaudit.propagation.ops.base import Ctx, Effect, as_tuple, handles, position_count


def _affine(weight, bias, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = weight.detach().double().reshape(-1) if weight is not None else torch.ones(n, dtype=torch.float64)
    b = bias.detach().double().reshape(-1) if bias is not None else torch.zeros(n, dtype=torch.float64)
    if g.numel() != n:
        g = torch.full((n,), float(g.pow(2).mean().sqrt()), dtype=torch.float64)
    if b.numel() != n:
        b = torch.full((n,), float(b.mean()), dtype=torch.float64)
    return g, b


def _normalized(ref: Ref, axis: int, gamma, beta, xhat_mean, xhat_m2, inv_var, tri, cov=None, pos=None, prof=None, excess=None, xcov=None) -> Effect:
    """y = gamma * x_hat + beta per channel, and its backward.

    Backward (Ioffe & Szegedy 2015): dL/dx = gamma / sigma * P(dL/dy), where P projects
    out the directions the statistics were computed along (the group mean and x_hat;
    RMSNorm: x_hat only). ``inv_var`` = E[1 / (sigma^2 + eps)] over the distribution of
    the sample variance (:func:`_sample_variance`); ``tri`` is P's action on the
    gradient's moments (:func:`_projection`):

        (g, s, x)_in = gamma^2 E[1 / (sigma^2 + eps)] tri @ (g, s, x)_out
    """
    mean = gamma * xhat_mean + beta
    m2 = gamma * gamma * xhat_m2 + 2 * gamma * beta * xhat_mean + beta * beta
    out = Stats.per_channel(axis, mean, m2, None if cov is None else gamma * gamma * cov, pos, None if xcov is None else gamma * gamma * xcov)
    out.prof = prof  # every position is divided by the same sigma
    gains = [] if tri is None else [(ref.name, 0, 0, channels.Tri(tri, gamma * gamma * inv_var, axis=axis, excess=excess))]
    return Effect([out], gains)


def _sample_variance(parts: list[tuple[Any, float]], eps: float, n: float = math.inf, count: float | None = None) -> tuple[Any, Any, Any]:
    """E[s^2], E[1 / (s^2 + eps)] and the x_hat direction's leak (:func:`moments.eps_leak`
    over ``count`` statistics; 0 for groups of more than :data:`LEAK_MAX_VALUES` values)
    of a sample variance over ``n`` values that is a sum of independent
    scaled chi-squares: ``parts`` = [(E[part], degrees of freedom)]. Satterthwaite's
    approximation (1946) gives s^2 ~ E[s^2] chi^2_nu / nu with nu = E[s^2]^2 /
    sum_i E[part_i]^2 / nu_i, and :func:`moments.inverse_moment` the mean of its inverse.

    For n independent values this is nu = n - 1 and E[1 / s^2] = n / ((n - 3) Var): a
    normalization over a small group (BatchNorm over 2x2 maps of 2 samples: n = 8)
    divides by a noisy variance, and its backward gain is 1.6x the 1 / Var of its mean."""
    total = sum(e for e, _ in parts)
    denom = sum(e * e / torch.as_tensor(nu, dtype=torch.float64).clamp_min(1e-9) for e, nu in parts)
    total_t = torch.as_tensor(total, dtype=torch.float64).clamp_min(1e-300)
    nu = total_t * total_t / torch.as_tensor(denom, dtype=torch.float64).clamp_min(1e-300)
    inv = inverse_moment(nu, eps / total_t) / total_t
    return total_t, inv, eps_leak(nu, eps / total_t, count) if n <= LEAK_MAX_VALUES else 0.0


def _projection(n: float, p: float, rho_s, rho_x, centred: bool = True, leak=0.0) -> torch.Tensor:
    """How removing the group mean and the x_hat direction acts on a gradient's moments.

    A group of n values holds n / p samples of p positions each (p = 1 for a group of
    unrelated values). Its gradient has E[g^2] = g, E[g_i g_j] = s in one sample and x
    across samples; x_hat has within- and cross-sample correlations rho_s, rho_x. The
    group mean m and c = mean(g x_hat) have (exchangeable values)

        E[m^2] = g / n + (p - 1) s / n + (n - p) x / n
        E[c^2] = g / n + (p - 1) rho_s s / n + (n - p) rho_x x / n

    and P g = g - m - x_hat c (1 and x_hat are orthogonal: x_hat is centred), so

        g' = g - E[m^2] - E[c^2],   s' = s - E[m^2] - rho_s E[c^2],   x' = x - E[m^2] - rho_x E[c^2].

    Independent values (s = x = 0) keep (n - 2) / n (the usual factor); a gradient shared
    by all p positions of a sample (after global pooling) loses its batch mean: half of
    it for 2 samples; one that a previous normalization already centred (x = -E[m^2])
    loses nothing more. ``rho_s``, ``rho_x`` may be per-channel vectors. Without
    centring (RMSNorm) only the x_hat direction goes. ``leak`` is the share of E[c^2]
    that eps leaves in place (:func:`moments.eps_leak`): all of it for 2 values, where
    the mean and x_hat span the group."""
    rho_s = torch.as_tensor(rho_s, dtype=torch.float64)
    rho_x = torch.as_tensor(rho_x, dtype=torch.float64)
    rho_s, rho_x = torch.broadcast_tensors(rho_s, rho_x)
    one = torch.ones_like(rho_s)
    mc = torch.stack([one / n, one * (p - 1) / n, one * (n - p) / n], -1) if centred else torch.zeros(*rho_s.shape, 3, dtype=torch.float64)
    cc = torch.stack([one / n, rho_s * (p - 1) / n, rho_x * (n - p) / n], -1)
    if isinstance(leak, torch.Tensor):
        cc = cc * (1.0 - leak).unsqueeze(-1)
    eye = torch.eye(3, dtype=torch.float64).expand(*rho_s.shape, 3, 3)
    rows = torch.stack([mc + cc, mc + rho_s.unsqueeze(-1) * cc, mc + rho_x.unsqueeze(-1) * cc], -2)
    return (eye - rows).clamp_min(-1.0)


#: Groups of at most this many values get the x_hat direction's eps leak
#: (:func:`moments.eps_leak`): over 2 values the mean and x_hat span the group and the
#: leak is all the gradient there is. In larger groups it is a correction of at most
#: (1 - r)^2 / n of the power (r = s^2 / (s^2 + eps)), left out: added there, it put the
#: stems of torchvision's EfficientNet-V2-M and -L 2.4x and 2x high (their depthwise
#: outputs are 10x below eps = 1e-3, so r ~ 0.1 at every block). Measured on five of
#: V2-M's blocks, it makes the gain of the norm after each depthwise convolution exact
#: (6% low without it), but the norm after each block's expansion is then 5% high per
#: block, an error of its own not found yet, which the missing leak cancels.
LEAK_MAX_VALUES = 2



def _eps(value: Any, default: float = 1e-5) -> float:
    return float(default if value is None else value)


@handles("batch_norm")
def batch_norm(ctx: Ctx) -> Effect:
    """BatchNorm in training mode: each channel normalised over batch and positions.

    A channel's n values are b samples of p positions: x = mu + a_sample + e with
    Var(a) = s (the coherent part) and Var(e) = f = v - s; two samples' values share
    the covariance c (``Stats.xcov``: negative behind an earlier batch normalization,
    whose batch sums were 0). A sample's mean has variance s + f/p and covariance c with
    another's, so the batch variance is within-sample f chi^2_{b(p-1)} / n plus
    between-sample (s + f/p - c) chi^2_{b-1} / b: E[s^2] = f (p - 1)/p + (s + f/p -
    c)(b - 1)/b (:func:`_sample_variance`; equivalently v - Var(batch mean)). The batch
    mean has variance V = (s + f/p) / b + c (b - 1) / b, and x_hat's correlations are
    rho_s = (s - V) / E[s^2] within a sample and rho_x = (c - V) / E[s^2] across samples
    (the output's coherent and cross-sample covariances). The backward is
    :func:`_normalized` with :func:`_projection`. With s = c = 0 and n large this is
    the classic gamma^2 / Var (n - 2) / n.
    """
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps", 1e-5)
    else:
        weight, bias = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias"))
        eps = ctx.arg(7, "eps", 1e-5)
    eps = _eps(eps)
    x = ctx.stat(ref)
    axis = 1 if len(meta.shape) > 1 else 0
    c = meta.shape[axis]
    n = meta.numel / c
    pos = tuple(range(2, len(meta.shape))) or None
    p = float(position_count(meta, pos)) if pos is not None and x.pos == pos else 1.0
    b = n / p
    _, var = x.channels(axis, c)
    s = x.coherent(axis, c).maximum(-var / (p - 1)).minimum(var) if p > 1 else torch.zeros_like(var)
    f = var - s
    between = s + f / p
    cross = x.cross(axis, c).maximum(-between / max(b - 1, 1)).minimum(between) if b > 1 else torch.zeros_like(var)
    e_s2, inv, leak = _sample_variance([(f * (p - 1) / p, b * (p - 1)), ((between - cross) * (b - 1) / b, b - 1)], eps, n, c)
    v_mean = between / b + cross * (b - 1) / b
    rho_s = (s - v_mean) / e_s2
    rho_x = (cross - v_mean) / e_s2
    gamma, beta = _affine(weight, bias, c)
    zero = torch.zeros(c, dtype=torch.float64)
    out_pos = pos if p > 1 else (pos if pos is not None else None)
    cov = (s - v_mean) / (e_s2 + eps) if out_pos is not None else None
    tri = _projection(n, p, rho_s, rho_x, leak=leak)
    # a ReLU after the norm makes the gradient follow x_hat (its mask): with a gradient
    # shared by positions, mean(g x_hat) no longer averages out (removed, like the rest
    # of c, but for its leak)
    kept = (gamma * gamma).clamp_min(1e-12)
    excess = (n, p, kept / (1.0 - leak).clamp_min(1e-12) if isinstance(leak, torch.Tensor) else kept, rho_s, rho_x)
    prof = x.prof if x.pos == out_pos else None
    return _normalized(ref, axis, gamma, beta, zero, e_s2 / (e_s2 + eps), inv, tri, cov, out_pos, prof, excess, (cross - v_mean) / (e_s2 + eps))


@handles("layer_norm", "rms_norm")
def layer_norm(ctx: Ctx) -> Effect:
    """LayerNorm (Ba et al. 2016) / RMSNorm (Zhang & Sennrich 2019) over the last dims.

    Per sample the statistics run over the n features, so feature c of x_hat has mean
    (mu_c - mu) / sigma and second moment (v_c + (mu_c - mu)^2) / sigma^2, with mu and
    sigma^2 the averages over features (RMSNorm: x_hat_c = x_c / rms, rms^2 = E[x^2]).
    The per-token sigma^2 is a sum of n independent terms, feature c contributing
    v_c chi^2_1 shifted by (mu_c - mu)^2 (non-central: variance 2 v_c^2 + 4 v_c (mu_c -
    mu)^2), so :func:`_sample_variance` gives E[1 / (sigma^2 + eps)] -- unless the rows'
    mean square is known to vary less (``Stats.row_var``: the input is a LayerNorm's
    output plus a residual branch, Post-LN), then its own variance sets the degrees of
    freedom. The backward projects out the token's mean and x_hat
    (:class:`channels.RowNorm`), except what a LayerNorm downstream already removed;
    the parts of x and of the gradient shared by all positions pass scaled like the rest.
    """
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    rms = ctx.node.op == "rms_norm"
    if ctx.node.kind == "call_module":
        shape = ctx.attr("normalized_shape")
        weight, bias = ctx.param("weight"), ctx.param("bias")
        eps = ctx.attr("eps", 1e-5)
    elif rms:
        shape, weight, bias, eps = ctx.arg(1, "normalized_shape"), ctx.const(ctx.arg(2, "weight")), None, ctx.arg(3, "eps")
    else:
        shape = ctx.arg(1, "normalized_shape")
        weight, bias = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias"))
        eps = ctx.arg(4, "eps", 1e-5)
    eps = _eps(eps, torch.finfo(torch.float32).eps)
    n = math.prod(as_tuple(shape, 1))
    x = ctx.stat(ref)
    axis = len(meta.shape) - 1
    c = meta.shape[axis]
    mean_c, var_c = x.channels(axis, c)
    cov_c = x.coherent(axis, c) if x.pos is not None else None
    if n != c:  # normalised over several dims: no per-feature detail
        mean_c = torch.full((c,), x.mean, dtype=torch.float64)
        var_c = torch.full((c,), x.var, dtype=torch.float64)
        cov_c = torch.full((c,), x.scalar().cov, dtype=torch.float64) if x.pos is not None else None
    gamma, beta = _affine(weight, bias, c)
    d = mean_c if rms else mean_c - mean_c.mean()
    e_s2 = float((var_c + d * d).sum() / n)
    if x.row_var is not None and n == c:  # the rows' mean square is known (a LayerNorm upstream)
        spread = x.row_var + (0.0 if rms else 2 * float(var_c.sum() / n**2) ** 2)
        dof = 2 * e_s2 * e_s2 / spread if spread > 0 else math.inf
    else:
        dof = _dof(var_c, d)
    _, inv, _ = _sample_variance([(e_s2, dof)], eps)
    cov = cov_c / (e_s2 + eps) if cov_c is not None else None
    xhat_mean, xhat_m2 = d / math.sqrt(e_s2 + eps), (var_c + d * d) / (e_s2 + eps)
    per_pos = _position_variances(x, meta, axis, float(var_c.sum() / n), float((d * d).sum() / n))
    pos_k = None
    if per_pos is not None:
        rel, e_p = per_pos
        _, inv_p, _ = _sample_variance([(e_p, dof)], eps)
        pos_k = inv_p / inv
        xhat_mean = d * float((e_p + eps).rsqrt().mean())
        xhat_m2 = var_c * float((rel / (e_p + eps)).mean()) + d * d * float((1.0 / (e_p + eps)).mean())
    effect = _normalized(ref, axis, gamma, beta, xhat_mean, xhat_m2, None, None, cov, x.pos)
    g2, gb = gamma * gamma, gamma * beta
    # Var of the output rows' mean square: x_hat is on a sphere (sum x_hat^2 = n, and
    # sum x_hat = 0 unless RMS), so only gamma's and beta's spread make it random
    row_var = (2 * float((g2 * g2).sum()) - 2 * float(g2.sum()) ** 2 / n + 4 * float((gb * gb).sum()) - 4 * float(gb.sum()) ** 2 / n) / n**2
    effect.out[0].row_var = max(row_var, 0.0) if n == c else None
    sizes = tuple(meta.shape[a] for a in x.pos) if pos_k is not None else ()
    gain = channels.RowNorm(gamma, float(inv), float(n), rms, float((beta * beta).mean()), axis=axis, pos_k=pos_k, pos_sizes=sizes)
    effect.gains = [(ref.name, 0, 0, gain)]
    return effect


#: Position profiles are resolved position by position up to this many positions.
MAX_PROFILE_POSITIONS = 1 << 20


def _position_variances(x: Stats, meta, axis: int, var: float, dev: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a row normalization of an input whose variance differs between positions
    (``Stats.prof``: a class token beside patch tokens, border pixels): the relative
    variance per position (flattened over the position axes) and the rows' expected
    mean square there, var * rel_p + dev (``dev``: the channel means' spread, the same at
    every position). None when the positions are alike or not tracked.

    Each position is divided by its own sigma_p, so the backward gain there is
    E[1 / (sigma_p^2 + eps)] (:func:`_sample_variance` per position): a position whose
    rows are 5x smaller passes a 5x larger gradient power."""
    if x.prof is None or x.pos is None or axis in x.pos:
        return None
    sizes = [meta.shape[a] for a in x.pos]
    if math.prod(sizes) > MAX_PROFILE_POSITIONS:
        return None
    rel = channels.outer_profile(x.prof, sizes)
    return rel, var * rel + dev


def _dof(var: torch.Tensor, shift: torch.Tensor) -> float:
    """Degrees of freedom of sum_c (x_c - shift_c)^2 over independent x_c ~ N(0, v_c)
    shifted by constants: E = sum (v + d^2), Var = sum (2 v^2 + 4 v d^2)."""
    e = float((var + shift * shift).sum())
    v = float((2 * var * var + 4 * var * shift * shift).sum())
    return e * e * 2 / v if v > 0 else math.inf


def _group_effect(ctx: Ctx, ref: Ref, groups: int, weight, bias, eps) -> Effect:
    """Per (sample, group of channels) normalisation: channel c in group G gets x_hat
    with mean (mu_c - mu_G)/sigma_G and second moment (v_c + (mu_c - mu_G)^2)/sigma_G^2.

    A group holds k channels of p positions; its sample variance is within-channel
    f_c chi^2_{p-1} / n plus the spread of the k channel averages (deterministic (mu_c -
    mu_G)^2 and random s_c + f_c / p); the group mean removes from each channel the
    part shared by its positions as BatchNorm removes the batch's (:func:`_projection`
    with the k channels in the role of samples: a coherent gradient or activation part is
    removed entirely by InstanceNorm, k = 1)."""
    eps = _eps(eps)
    meta = ctx.meta(ref)
    x = ctx.stat(ref)
    c = meta.shape[1]
    mean_c, var_c = x.channels(1, c)
    pos = tuple(range(2, len(meta.shape))) or None
    p = float(position_count(meta, pos)) if pos is not None else 1.0
    s_c = x.coherent(1, c).maximum(-var_c / max(p - 1, 1)).minimum(var_c) if (pos is not None and x.pos == pos) else torch.zeros(c, dtype=torch.float64)
    k = c // groups
    n = k * p
    mg, vg, sg = mean_c.reshape(groups, k), var_c.reshape(groups, k), s_c.reshape(groups, k)
    fg = vg - sg
    between = sg + fg / p
    dev = mg - mg.mean(1, keepdim=True)
    within = (fg * (p - 1) / p).sum(1) / k
    spread = (dev * dev + between).sum(1) / k * (k - 1) / k if k > 1 else torch.zeros(groups, dtype=torch.float64)
    nu_spread = _dof_rows(between, dev) * (k - 1) / max(k, 1)
    e_s2, inv, leak = _sample_variance([(within, k * (p - 1)), (spread, nu_spread.clamp_min(1e-3))], eps, n, groups * meta.shape[0])
    v_mean = between.sum(1, keepdim=True) / (k * k)  # variance of the group mean
    e_col = e_s2.unsqueeze(1)
    xm = (dev / (e_col + eps).sqrt()).reshape(-1)
    x2 = ((vg + dev * dev - v_mean) / (e_col + eps)).clamp_min(0.0).reshape(-1)
    rho_s = ((sg - v_mean) / e_col).reshape(-1)
    inv_c = inv.unsqueeze(1).expand(groups, k).reshape(-1)
    gamma, beta = _affine(weight, bias, c)
    cov = ((sg - v_mean) / (e_col + eps)).reshape(-1) if pos is not None else None
    if isinstance(leak, torch.Tensor):
        leak = leak.unsqueeze(1).expand(groups, k).reshape(-1)
    tri = _projection(n, p, rho_s, torch.zeros_like(rho_s), leak=leak)
    # the group mean is taken per sample: a gradient part shared across samples stays
    tri[..., 2, :] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    return _normalized(ref, 1, gamma, beta, xm, x2, inv_c, tri, cov, pos, x.prof if x.pos == pos else None)


def _dof_rows(var: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`_dof` per row."""
    e = (var + shift * shift).sum(1)
    v = (2 * var * var + 4 * var * shift * shift).sum(1)
    return torch.where(v > 0, 2 * e * e / v.clamp_min(1e-300), torch.full_like(e, math.inf))


@handles("group_norm")
def group_norm(ctx: Ctx) -> Effect:
    """GroupNorm (Wu & He 2018): statistics over C/G channels and all positions."""
    ref = ctx.arg(0, "input")
    if ctx.node.kind == "call_module":
        groups, weight, bias, eps = ctx.attr("num_groups"), ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        groups = ctx.arg(1, "num_groups")
        weight, bias, eps = ctx.const(ctx.arg(2, "weight")), ctx.const(ctx.arg(3, "bias")), ctx.arg(4, "eps", 1e-5)
    return _group_effect(ctx, ref, groups, weight, bias, eps)


@handles("instance_norm")
def instance_norm(ctx: Ctx) -> Effect:
    """InstanceNorm (Ulyanov et al. 2016): statistics per sample and channel, i.e.
    GroupNorm with one channel per group."""
    ref = ctx.arg(0, "input")
    meta = ctx.meta(ref)
    if ctx.node.kind == "call_module":
        weight, bias, eps = ctx.param("weight"), ctx.param("bias"), ctx.attr("eps")
    else:
        weight, bias, eps = ctx.const(ctx.arg(3, "weight")), ctx.const(ctx.arg(4, "bias")), ctx.arg(7, "eps", 1e-5)
    return _group_effect(ctx, ref, meta.shape[1], weight, bias, eps)
