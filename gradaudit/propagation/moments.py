"""Gaussian expectations of any elementwise function, evaluated on the real torch code.

Mean-field signal propagation (Poole et al. 2016; Schoenholz et al., ICLR 2017) needs,
for a pre-activation x ~ N(mu, q) and an activation phi:

    E[phi(x)],   E[phi(x)^2]   (forward length map)
    E[phi'(x)^2]               (backward gain: chi_1 = s_w^2 E[phi'(x)^2])

We compute them by quadrature on x = mu + sqrt(q) z, z ~ N(0, 1), calling the actual
function (a torch function, an ``nn.Module`` or a user's own callable) on the nodes and
differentiating it with autograd. Gauss-Hermite rules converge fast for smooth phi but
lose accuracy when phi' jumps (SELU at 0: E[phi'^2] is off by 1.5% at 64 nodes), so we
use a fine midpoint rule on z in [-10, 10] with Gaussian weights: spectrally accurate
for smooth phi, error below 1e-4 for jumps, and still only a few thousand evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

N_NODES = 4000
Z_MAX = 10.0


@lru_cache(maxsize=4)
def _midpoint_grid(n: int, z_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n midpoints z_k on [-z_max, z_max] (float64) and normalised N(0, 1) weights."""
    h = 2 * z_max / n
    z = torch.arange(n, dtype=torch.float64) * h - z_max + h / 2
    w = torch.exp(-0.5 * z * z)
    return z, w / w.sum()


def gaussian_points(mean: float, var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes x_k (float64) and weights w_k for x ~ N(mean, var)."""
    z, w = _midpoint_grid(N_NODES, Z_MAX)
    return mean + math.sqrt(max(var, 0.0)) * z, w


N_CHANNEL_NODES = 256
Z_MAX_CHANNELS = 8.0


def channel_points(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes of shape (nodes, C) for C independent channels x_c ~ N(mean_c, var_c), and
    the weights (nodes,). A coarser grid than :func:`gaussian_points` (256 nodes on
    [-8, 8]) keeps wide layers cheap; the nodes are float32, the sums float64."""
    z, w = _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS)
    z32 = z.float().unsqueeze(1)
    return mean.float().unsqueeze(0) + var.clamp_min(0.0).sqrt().float().unsqueeze(0) * z32, w


@lru_cache(maxsize=64)
def max_of_k_weights(window: int, channels: bool) -> torch.Tensor:
    """Weights, on the same nodes as :func:`gaussian_points` (or :func:`channel_points`
    when ``channels``), for the largest of ``window`` independent draws: the density of
    the maximum of k standard normals is k phi(z) Phi(z)^(k-1)."""
    z, w = _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS) if channels else _midpoint_grid(N_NODES, Z_MAX)
    wk = w * (0.5 * (1 + torch.erf(z / math.sqrt(2)))).pow(window - 1)
    return wk / wk.sum()


@dataclass(frozen=True)
class Expectations:
    """E[phi], E[phi^2] and E[phi'^2] under the Gaussian the function was fed."""

    mean: float
    m2: float
    d2: float


def expectations(fn: Callable[[torch.Tensor], torch.Tensor], mean: float, var: float) -> Expectations:
    """Gaussian expectations of an elementwise ``fn`` under x ~ N(mean, var).

    ``fn`` is evaluated in float64 when it accepts it, otherwise in float32.
    Non-finite outputs (log of negative numbers, overflow) propagate as nan/inf,
    which is what a real forward pass would produce.
    """
    x, w = gaussian_points(mean, var)
    for dtype in (torch.float64, torch.float32):
        xt = x.to(dtype).requires_grad_(True)
        try:
            with torch.enable_grad():
                y = fn(xt)
                if not isinstance(y, torch.Tensor) or y.shape != xt.shape:
                    raise TypeError("not an elementwise function")
                if y.requires_grad:
                    (d,) = torch.autograd.grad(y.sum(), xt, allow_unused=True)
                    d = torch.zeros_like(xt) if d is None else d
                else:
                    d = torch.zeros_like(xt)
        except (RuntimeError, TypeError):
            if dtype is torch.float32:
                raise
            continue
        y64 = y.detach().to(torch.float64)
        d64 = d.detach().to(torch.float64)
        return Expectations(
            mean=float((w * y64).sum()),
            m2=float((w * y64 * y64).sum()),
            d2=float((w * d64 * d64).sum()),
        )
    raise AssertionError("unreachable")


def critical_weight_variance(fn: Callable, bias_var: float = 0.0, *, iters: int = 200) -> tuple[float, float]:
    """The (s_w^2, q*) at which chi_1 = 1 for a fully connected phi network.

    Solves the mean-field fixed point q* = s_w^2 E[phi(sqrt(q*) z)^2] + s_b^2 together
    with chi_1 = s_w^2 E[phi'(sqrt(q*) z)^2] = 1 (Schoenholz et al. 2017, Eq. 3-5) by
    bisection on q*: on the critical line s_w^2 = 1 / E[phi'^2], and q* must satisfy
    the length map. Returns ``(s_w^2, q*)``.
    """

    def residual(q: float) -> tuple[float, float]:
        e = expectations(fn, 0.0, q)
        sw2 = 1.0 / e.d2
        return sw2 * e.m2 + bias_var - q, sw2

    if bias_var == 0.0:
        e = expectations(fn, 0.0, 1e-10)
        return 1.0 / e.d2, 0.0
    lo, hi = 1e-9, 1.0
    while residual(hi)[0] > 0 and hi < 1e6:
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if residual(mid)[0] > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    q = 0.5 * (lo + hi)
    return residual(q)[1], q


def depth_scale(chi: float) -> float:
    """Schoenholz et al.'s gradient depth scale xi = 1 / |ln chi_1|: the number of layers
    over which the gradient changes by a factor e (-1/ln chi_1 for chi_1 < 1, where it
    vanishes; inf at chi_1 = 1)."""
    if chi <= 0:
        return 0.0
    if abs(math.log(chi)) < 1e-12:
        return math.inf
    return 1.0 / abs(math.log(chi))


# --------------------------------------------------------------------------- coherence
#: Hermite coefficients kept for coherent covariances (the rest is summed as one tail).
N_HERMITE = 24


@lru_cache(maxsize=4)
def hermite_table(channels: bool) -> torch.Tensor:
    """w_k psi_n(z_k) on the nodes of :func:`gaussian_points` (or :func:`channel_points`
    when ``channels``), shape (nodes, N_HERMITE + 1), psi_n = He_n / sqrt(n!) the
    orthonormal probabilists' Hermite polynomials (psi_{n+1} = (z psi_n - sqrt(n)
    psi_{n-1}) / sqrt(n + 1)). ``table.T @ f(nodes)`` gives f's Hermite coefficients."""
    z, w = _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS) if channels else _midpoint_grid(N_NODES, Z_MAX)
    psi = [torch.ones_like(z), z.clone()]
    for n in range(1, N_HERMITE):
        psi.append((z * psi[n] - math.sqrt(n) * psi[n - 1]) / math.sqrt(n + 1))
    table = torch.stack(psi, dim=1) * w.unsqueeze(1)
    return table.float() if channels else table


@lru_cache(maxsize=4)
def _orders(channels: bool) -> torch.Tensor:
    return torch.arange(1, N_HERMITE + 1, dtype=torch.float64)


def hermite_coefficients(values: torch.Tensor, channels: bool, orders: int | None = None) -> torch.Tensor:
    """Coefficients a_n = E[f(x) psi_n(z)] of values f on the quadrature nodes: shape
    (N + 1,) or (N + 1, C) with N = ``orders`` (default N_HERMITE)."""
    table = hermite_table(channels)
    if orders is not None:
        table = table[:, : orders + 1]
    if values.dim() == 2:
        return (table.t() @ values.to(table.dtype)).double()
    return table.t() @ values.double()


def coherent_moment(coef: torch.Tensor, var: torch.Tensor | float, rho: torch.Tensor | float) -> torch.Tensor:
    """E[f(x_i) f(x_j)] - E[f]^2 for x_i, x_j ~ N(mu, v) with correlation rho (Mehler's
    formula: the bivariate Gaussian density is diagonal in the Hermite basis, so
    Cov(f(x_i), f(x_j)) = sum_{n >= 1} a_n^2 rho^n; O'Donnell 2014, Prop. 11.33; the
    dual-activation kernels of Daniely et al. 2016). ``var`` = Var[f] closes the sum:
    the coefficients beyond N = N_HERMITE carry T = var - sum a_n^2, spread as a jump
    discontinuity spreads them (a_n^2 ~ n^(-3/2), ReLU's derivative): T sum_{n>N}
    n^(-3/2) rho^n / sum_{n>N} n^(-3/2) = T (e^(-x) - sqrt(pi x) erfc(sqrt(x))) with x =
    (N + 1/2) ln(1/rho), in the continuum limit. Exact at rho = 0 and rho = 1 (where it
    returns Var[f]); the ReLU kernel (Cho & Saul 2009) to 4e-4 of Var[f], its derivative's to 2%
    at rho = 0.99. Negative rho (values a normalization centred) alternates the signs."""
    a2 = coef[1:] ** 2
    n = a2.shape[0]
    rho_t = torch.as_tensor(rho, dtype=torch.float64).clamp(-1.0, 1.0)
    orders = _orders(a2.dim() == 2)[:n]
    powers = rho_t.unsqueeze(-1) ** orders if rho_t.dim() else rho_t ** orders  # (C, N) or (N,)
    if a2.dim() == 2:
        head = (powers * a2.t()).sum(-1)
        total = a2.sum(0)
    else:
        head = (powers * a2).sum(-1) if powers.dim() == 1 else powers @ a2
        total = a2.sum()
    x = (n + 0.5) * -torch.log(rho_t.clamp_min(1e-300))
    spread = torch.exp(-x) - torch.sqrt(math.pi * x) * torch.erfc(torch.sqrt(x))
    spread = torch.where(rho_t > 0, spread.clamp(0.0, 1.0), torch.zeros_like(spread))  # an alternating tail sums to ~0
    tail = (torch.as_tensor(var, dtype=torch.float64) - total).clamp_min(0.0) * spread
    return head + tail


# --------------------------------------------------------------------------- sample statistics
N_CHI = 256


@lru_cache(maxsize=1)
def _log_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """u = log(y) on [-30, 6]: nodes and step for integrals over a positive variable."""
    u = torch.linspace(-30.0, 6.0, N_CHI, dtype=torch.float64)
    return u, u[1] - u[0]


def _chi_density(nu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log grid's nodes y and the weights of y = chi^2_nu / nu there (rows: nu)."""
    u, du = _log_grid()
    k = (nu / 2).unsqueeze(-1)  # Gamma(k, scale 1/k): mean 1, variance 1/k = 2/nu
    y = u.exp()
    log_pdf = k * torch.log(k) + (k - 1) * torch.log(y) - k * y - torch.lgamma(k)
    dens = torch.exp(log_pdf + u) * du  # dy = y du
    return y, dens / dens.sum(-1, keepdim=True)


def _chi_expectation(nu: torch.Tensor, e: torch.Tensor, fn) -> torch.Tensor:
    """E[fn(y, e)] for y = chi^2_nu / nu on the log grid, per entry (nu, e: 1-d)."""
    y, dens = _chi_density(nu)
    return (dens * fn(y, e.unsqueeze(-1))).sum(-1)


def inverse_moment(dof: torch.Tensor | float, ratio: torch.Tensor | float) -> torch.Tensor:
    """E[1 / (y + e)] for y = chi^2_nu / nu (mean 1), per entry of ``dof`` (nu) and
    ``ratio`` (e). A normalization divides by its sample variance s^2 + eps over a
    group of values: with E[s^2] = m and nu the degrees of freedom of s^2 (n - 1 for n
    independent Gaussians), E[1 / (s^2 + eps)] = inverse_moment(nu, eps / m) / m. For
    large nu this is 1 / (1 + e); for small groups it is larger (n / (n - 3) for
    eps = 0: the inverse chi-square mean), which is what makes the backward gain of a
    BatchNorm over 2x2 maps of 2 samples 1.6x larger than 1 / Var.

    The integral runs on a log grid (the chi-square density y^(nu/2 - 1) is singular
    at 0 for nu < 2); for nu > 50 the Taylor series of 1 / (y + e) around 1 over the
    central moments of y (2/nu, 8/nu^2, 12/nu^2 + 48/nu^3) is exact to ~1e-5."""
    nu = torch.as_tensor(dof, dtype=torch.float64).clamp_min(1e-3)
    e = torch.as_tensor(ratio, dtype=torch.float64).clamp_min(0.0)
    nu, e = torch.broadcast_tensors(nu, e)
    a = 1.0 / (1.0 + e)
    approx = a + (2.0 / nu) * a**3 - (8.0 / nu**2) * a**4 + (12.0 / nu**2 + 48.0 / nu**3) * a**5
    small = nu <= 50
    if not bool(small.any()):
        return approx
    out = approx.clone()
    out[small] = _chi_expectation(nu[small], e[small], lambda y, r: 1.0 / (y + r))
    return out


def eps_leak(dof: torch.Tensor | float, ratio: torch.Tensor | float, count: float | None = None) -> torch.Tensor:
    """The share of the x_hat direction that a normalization's backward does not remove:
    E[e^2 / (y + e)^3] / E[1 / (y + e)], y = chi^2_nu / nu, e = eps / E[s^2].

    x_hat = (x - m) / sqrt(s^2 + eps) has |x_hat|^2 = n r, r = s^2 / (s^2 + eps), so
    P g = g - mean(g) - x_hat mean(g x_hat) leaves (1 - r) of g's component along x_hat
    (Ioffe & Szegedy 2015's backward, with eps kept): its power (1 - r)^2 = e^2 / (y +
    e)^2 is weighted, like the rest, by 1 / (s^2 + eps). Negligible for a large group;
    for a group of 2 values (BatchNorm1d over a batch of 2) the output is +-1 whatever
    x is, and this leak is all the gradient there is: dL/dx_1 = gamma (g_1 - g_2) / 2 *
    eps / (d^2 + eps)^(3/2) with d = (x_1 - x_2) / 2.

    For few degrees of freedom the leak's mean is carried by near-ties (y near 0: about
    3 pi / (8 sqrt(2 pi Var d)) eps^(-1/2) for nu = 1), which a layer of ``count``
    statistics (its channels) meets only when count is large: one draw of C channels
    reaches down to about its ln 2 / C quantile of y (the median of the smallest of C
    draws). With ``count`` the leak is the typical value of that channel average, the
    mean over y above that quantile (the
    2-value normalizations of squeeze-and-excitation bottlenecks: 10-100 channels, whose
    full mean would be 4-5 decades above any one draw); without, the full mean."""
    nu = torch.as_tensor(dof, dtype=torch.float64).clamp_min(1e-3)
    e = torch.as_tensor(ratio, dtype=torch.float64).clamp_min(0.0)
    nu, e = torch.broadcast_tensors(nu, e)
    a = 1.0 / (1.0 + e)
    # nu large: Taylor series of (y + e)^-3 around 1, as in inverse_moment
    ea = e * a  # e^2 a^k = (e a)^2 a^(k - 2): finite for eps far above the variance
    num = ea * ea * (a + 12.0 / nu * a**3 - 80.0 / nu**2 * a**4 + 15.0 * (12.0 / nu**2 + 48.0 / nu**3) * a**5)
    approx = num / inverse_moment(nu.clamp_min(51.0), e)
    small = nu <= 50
    if not bool(small.any()):
        return approx
    out = approx.clone()
    ns, es = nu[small], e[small]
    y, dens = _chi_density(ns)
    if count is not None and count >= 1:  # y above its ln 2 / count quantile
        dens = torch.minimum(dens, (dens.cumsum(-1) - math.log(2.0) / count).clamp_min(0.0))
    r = es.unsqueeze(-1)
    share = r / (y + r)
    # e^2 / (y + e)^3 over 1 / (y + e), both times e: share^3 over share (no overflow)
    out[small] = (dens * share**3).sum(-1) / (dens * share).sum(-1).clamp_min(1e-300)
    return out


# --------------------------------------------------------------------------- positive values
def gamma_points(mean: torch.Tensor | float, var: torch.Tensor | float, channels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes for y ~ Gamma with the given mean and variance (shape k = mean^2 / var,
    scale var / mean), on the same weights as :func:`gaussian_points` (or
    :func:`channel_points` when ``channels``): node i is the Gamma quantile at
    Phi(z_i), so sum_i w_i f(y_i) -> E[f(y)] exactly as the Gaussian rule converges
    (quantile coupling). A mean of squares or a variance is positive and skewed: a
    Gaussian with its moments would put nodes below 0, where rsqrt and log are NaN.

    The inverse of the regularized incomplete gamma function comes from Newton steps on
    log y, started at the Wilson-Hilferty cube (Johnson, Kotz & Balakrishnan 1994,
    ch. 17) or, in the lower tail, at y = (p Gamma(k + 1))^(1/k); the upper half solves
    Q = 1 - p for precision."""
    z, w = _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS) if channels else _midpoint_grid(N_NODES, Z_MAX)
    mean_t = torch.as_tensor(mean, dtype=torch.float64).clamp_min(1e-300)
    var_t = torch.as_tensor(var, dtype=torch.float64).clamp_min(1e-300)
    k = (mean_t * mean_t / var_t).clamp(1e-3, 1e8)
    theta = var_t / mean_t
    zz = z.unsqueeze(1) if channels else z
    kk = k.unsqueeze(0) if channels else k
    p = 0.5 * torch.erfc(-zz / math.sqrt(2))
    upper = zz > 0
    q = 0.5 * torch.erfc(zz / math.sqrt(2))  # 1 - p without cancellation
    wh = (1 - 1 / (9 * kk) + zz * torch.sqrt(1 / (9 * kk))) ** 3
    lgk = torch.lgamma(kk)
    # lower tail: P(k, y) ~ y^k / Gamma(k + 1)
    tail = (torch.log(p.clamp_min(1e-300)) + torch.lgamma(kk + 1)) / kk
    t = torch.where((wh <= 0.05) | ((p < 1e-3) & (kk < 5)), tail, torch.log((kk * wh).clamp_min(1e-300)))
    kk, lgk, p, q, upper, t = torch.broadcast_tensors(kk, lgk, p, q, upper, t)
    t = t.clone()
    active = torch.ones_like(t, dtype=torch.bool)
    for _ in range(40):  # Newton on the entries that have not converged yet
        ka, ta, ua = kk[active], t[active], upper[active]
        y = torch.exp(ta)
        dens = torch.exp(ka * ta - y - lgk[active])  # d P / d log y
        err = torch.empty_like(ta)
        err[ua] = q[active][ua] - torch.special.gammaincc(ka[ua], y[ua])  # Q - q falls as P - p rises
        err[~ua] = torch.special.gammainc(ka[~ua], y[~ua]) - p[active][~ua]
        step = (err / dens.clamp_min(1e-300)).clamp(-2.0, 2.0)
        t[active] = ta - step
        still = step.abs() >= 1e-9
        if not bool(still.any()):
            break
        active[active.clone()] = still
    x = torch.exp(t) * (theta.unsqueeze(0) if channels else theta)
    return (x.float() if channels else x), w


#: Skewnesses at which the standardised shifted-Gamma nodes of :func:`skewed_points` are
#: tabulated for per-channel roots (interpolated linearly between them, clamped at the ends).
SKEW_GRID = (0.05, 4.0, 40)


@lru_cache(maxsize=1)
def _standard_skewed_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(skewness grid (G,), nodes (N_CHANNEL_NODES, G)): Gamma quantile nodes of mean 0,
    variance 1 and skewness g, on the weights of :func:`channel_points`. The Newton
    solve of :func:`gamma_points` costs ~0.3 s for 256 x 500 nodes; tabulated once, a
    root of any number of channels only interpolates."""
    lo, hi, n = SKEW_GRID
    g = torch.linspace(lo, hi, n, dtype=torch.float64)
    k = 4.0 / (g * g)
    nodes, _ = gamma_points(k.sqrt(), torch.ones_like(k), True)  # mean sqrt(k), variance 1
    return g, (nodes.double() - k.sqrt()).float()


def _skewed_channel_nodes(g: torch.Tensor) -> torch.Tensor:
    """Standardised nodes (N, C) for per-channel skewnesses g >= 0 (table interpolation,
    then re-standardised so each column's mean and variance are exactly 0 and 1)."""
    grid, table = _standard_skewed_table()
    gc = g.clamp(float(grid[0]), float(grid[-1]))
    pos = (gc - grid[0]) / (grid[1] - grid[0])
    i0 = pos.floor().long().clamp(0, grid.numel() - 2)
    t = (pos - i0).float().unsqueeze(0)
    lo = table.index_select(1, i0)  # the same columns as table[:, i0], gathered 6x faster
    u = torch.addcmul(lo, table.index_select(1, i0 + 1) - lo, t)
    _, w = _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS)
    w32 = w.float()
    m = w32 @ u
    u = u - m
    sd = (w32 @ (u * u)).sqrt()
    return u / sd


def skewed_points(mean, var, k3, channels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes for a value of the given mean, variance and third central moment k3 (per
    channel when ``channels``), on the weights of :func:`gaussian_points` (or
    :func:`channel_points`): a Gamma shifted to the mean, its shape set by the skewness
    g = k3 / var^(3/2) (Gamma(k): skewness 2 / sqrt(k), so k = 4 / g^2), mirrored when
    g < 0; the Gaussian nodes where |g| < 0.05. The sum of a Gaussian and a ReLU's output
    (a residual stream: relu(x + branch)) is skewed; a ReLU of it passes 6-10% more
    variance than the Gaussian of the same two moments would, which the shifted Gamma
    reproduces to 1% (Pearson type III; Johnson, Kotz & Balakrishnan 1994, ch. 17).
    Per channel the standardised nodes come from a table over g in [0.05, 4]
    (:func:`_standard_skewed_table`; stronger skewness is clamped to 4)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    var_t = torch.as_tensor(var, dtype=torch.float64).clamp_min(1e-300)
    g = torch.as_tensor(k3, dtype=torch.float64) / var_t**1.5
    sd = var_t.sqrt()
    skewed = g.abs() >= 0.05
    if channels:
        u = _skewed_channel_nodes(g.abs())
        if bool((g < 0).any()):
            u = torch.where((g < 0).unsqueeze(0), -u.flip(0), u)  # node i: the quantile at Phi(z_i)
        nodes = mean_t.float() + sd.float() * u
        if bool(skewed.all()):  # no channel takes the Gaussian nodes
            return nodes, _midpoint_grid(N_CHANNEL_NODES, Z_MAX_CHANNELS)[1]
        plain, w = channel_points(mean_t, var_t)
        return torch.where(skewed.unsqueeze(0), nodes, plain), w
    if not bool(skewed):
        return gaussian_points(float(mean_t), float(var_t))
    gamma_mean = 2 * sd / g.abs()
    nodes, w = gamma_points(gamma_mean, var_t, False)
    shape = nodes - gamma_mean
    return mean_t + (-shape.flip(0) if bool(g < 0) else shape), w
