"""The quadrature building blocks against closed forms.

- Mehler's formula (:func:`coherent_moment`): the arc-cosine kernels of Cho & Saul
  (2009) give E[relu(u) relu(v)] and E[1(u>0) 1(v>0)] for unit Gaussians with
  correlation rho in closed form.
- :func:`inverse_moment`: E[1 / (chi^2_nu / nu)] = nu / (nu - 2) (inverse chi-square
  mean), and E[1 / (y + e)] -> 1 / (1 + e) for large nu.
- :func:`gamma_points`: the Gamma's mean, variance and E[1/y] = 1 / (theta (k - 1)).
"""

from __future__ import annotations

import math

import pytest
import torch

from gradaudit.propagation.moments import (
    channel_points,
    coherent_moment,
    gamma_points,
    gaussian_points,
    hermite_coefficients,
    eps_leak,
    inverse_moment,
    skewed_points,
)


def _relu_kernel(rho: float) -> float:
    """Cov(relu(u), relu(v)) for unit Gaussians with correlation rho (Cho & Saul 2009)."""
    return (math.sqrt(1 - rho * rho) + (math.pi - math.acos(rho)) * rho) / (2 * math.pi) - 1 / (2 * math.pi)


def _step_kernel(rho: float) -> float:
    """Cov(1(u>0), 1(v>0)) = (pi - arccos rho) / (2 pi) - 1/4 (the same paper, n = 0)."""
    return (math.pi - math.acos(rho)) / (2 * math.pi) - 0.25


@pytest.mark.parametrize("channels", [False, True], ids=["scalar-grid", "channel-grid"])
@pytest.mark.parametrize("rho", [-0.5, -0.1, 0.0, 0.3, 0.7, 0.95, 0.99, 1.0])
def test_mehler_matches_arc_cosine_kernels(rho, channels):
    x, w = channel_points(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)) if channels else gaussian_points(0.0, 1.0)
    for f, kernel, tol in ((torch.relu, _relu_kernel, 1e-3), (lambda t: (t > 0).to(t.dtype), _step_kernel, 0.025)):
        y = f(x)
        wc = w.unsqueeze(1) if y.dim() == 2 else w
        var = float((wc * y.double() ** 2).sum(0).reshape(-1)[0] - (wc * y.double()).sum(0).reshape(-1)[0] ** 2)
        coef = hermite_coefficients(y, channels)
        rho_t = torch.tensor([rho], dtype=torch.float64) if channels else rho
        got = float(coherent_moment(coef, torch.tensor([var], dtype=torch.float64) if channels else var, rho_t).reshape(-1)[0])
        want = kernel(rho)
        # relative to the variance (0.34 for relu, 0.25 for the step)
        assert abs(got - want) <= tol * var, f"rho={rho}: Mehler {got:.6f}, closed form {want:.6f}"


@pytest.mark.parametrize("nu", [4.0, 7.0, 20.0, 60.0, 500.0])
def test_inverse_moment_is_the_inverse_chi_square_mean(nu):
    got = float(inverse_moment(torch.tensor(nu), torch.tensor(0.0)))
    assert got == pytest.approx(nu / (nu - 2), rel=2e-3)


def test_inverse_moment_with_eps_and_large_groups():
    assert float(inverse_moment(torch.tensor(1e6), torch.tensor(0.5))) == pytest.approx(1 / 1.5, rel=1e-5)
    # a tiny group is bounded by eps, not infinite
    assert math.isfinite(float(inverse_moment(torch.tensor(1.0), torch.tensor(1e-6))))


@pytest.mark.parametrize("nu, e", [(1.0, 1e-2), (1.0, 1e-3), (2.0, 1e-2), (5.0, 1e-1), (80.0, 0.3)])
def test_eps_leak_against_sampled_chi_squares(nu, e):
    """E[e^2 / (y + e)^3] / E[1 / (y + e)] for y = chi^2_nu / nu, sampled."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        y = torch.distributions.Chi2(torch.tensor(nu, dtype=torch.float64)).sample((4_000_000,)) / nu
    want = float((e * e / (y + e) ** 3).mean() / (1.0 / (y + e)).mean())
    assert float(eps_leak(torch.tensor(nu), torch.tensor(e))) == pytest.approx(want, rel=0.03)


def test_eps_leak_of_two_values_is_all_the_gradient():
    """BatchNorm over 2 values: dL/dx_1 = gamma (g_1 - g_2) / 2 * eps / (d^2 + eps)^(3/2);
    the leak times E[1 / (s^2 + eps)] is E[eps^2 / (d^2 + eps)^3], d ~ N(0, 1)
    (s^2 = d^2: chi^2 with 1 degree of freedom), and a large group leaks nothing."""
    e = 1e-2
    d = torch.randn(4_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = float((e * e / (d * d + e) ** 3).mean())
    got = float(eps_leak(torch.tensor(1.0), torch.tensor(e)) * inverse_moment(torch.tensor(1.0), torch.tensor(e)))
    assert got == pytest.approx(want, rel=0.03)
    assert float(eps_leak(torch.tensor(1e4), torch.tensor(1e-5))) < 1e-9
    # a constant input (variance far below eps): x_hat is ~0 and nothing is removed
    for nu in (1.0, 1e4):
        got = eps_leak(torch.tensor(nu, dtype=torch.float64), torch.tensor(1e300, dtype=torch.float64), 64)
        assert float(got) == pytest.approx(1.0)


@pytest.mark.parametrize("channels, e", [(64, 1e-5), (256, 1e-5), (1024, 1e-5), (64, 1e-3), (16, 1e-2)])
def test_eps_leak_of_a_few_channels_is_their_typical_average(channels, e):
    """Over C channels of 2 values the gradient's power is the channel average of
    eps^2 / (d^2 + eps)^3: with count = C the leak is a typical value of that average,
    inside the interquartile range of 20,000 sampled layers (which spans 1-4 decades)."""
    d2 = torch.randn(20_000, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) ** 2
    averages = (e * e / (d2 + e) ** 3).mean(1)
    lo, hi = (float(q) for q in averages.quantile(torch.tensor([0.25, 0.75], dtype=torch.float64)))
    one, eps = torch.tensor(1.0), torch.tensor(e)
    got = float(eps_leak(one, eps, channels) * inverse_moment(one, eps))
    assert lo <= got <= hi, f"typical leak {got:.4g} outside the sampled quartiles [{lo:.4g}, {hi:.4g}]"


@pytest.mark.parametrize("k", [0.7, 2.0, 5.0, 40.0, 5000.0])
@pytest.mark.parametrize("channels", [False, True], ids=["scalar-grid", "channel-grid"])
def test_gamma_points_moments(k, channels):
    mean, var = 3.0, 9.0 / k
    if channels:
        x, w = gamma_points(torch.tensor([mean], dtype=torch.float64), torch.tensor([var], dtype=torch.float64), True)
        x, w = x[:, 0].double(), w
    else:
        x, w = gamma_points(mean, var, False)
    assert bool((x > 0).all())
    assert float((w * x).sum()) == pytest.approx(mean, rel=1e-4)
    assert float((w * x * x).sum() - (w * x).sum() ** 2) == pytest.approx(var, rel=2e-3)
    if k > 2.5:  # E[1/y] = 1 / (theta (k - 1)), theta = var / mean
        assert float((w / x).sum()) == pytest.approx(1 / ((var / mean) * (k - 1)), rel=1e-3)


@pytest.mark.parametrize("k3", [-0.9, -0.2, 0.01, 0.3, 1.2])
@pytest.mark.parametrize("channels", [False, True], ids=["scalar-grid", "channel-grid"])
def test_skewed_points_keep_three_moments(k3, channels):
    mean, var = 0.4, 1.7
    if channels:
        x, w = skewed_points(torch.tensor([mean]), torch.tensor([var]), torch.tensor([k3]), True)
        x = x[:, 0].double()
    else:
        x, w = skewed_points(mean, var, k3, False)
    m = float((w * x).sum())
    assert m == pytest.approx(mean, abs=1e-6)
    assert float((w * (x - m) ** 2).sum()) == pytest.approx(var, rel=2e-3)
    got = float((w * (x - m) ** 3).sum())
    if abs(k3) < 0.05 * var**1.5:  # below the threshold: the Gaussian's nodes
        assert abs(got) < 1e-6
    else:
        assert got == pytest.approx(k3, rel=5e-3)


@pytest.mark.parametrize("mu, sd", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.5)])
def test_relu_of_a_residual_sum(mu, sd):
    """x = a + relu(c), a ~ N(0, 1), c ~ N(mu, sd^2) independent (a residual stream): E[relu(x)^2]
    under the shifted Gamma of x's three moments against the exact double integral
    (a 4001 x 4001 midpoint grid); the Gaussian of two moments is 2-3% short on the
    second moment and 6-10% on the variance."""
    z, wz = gaussian_points(0.0, 1.0)
    c = torch.relu(mu + sd * z)
    x = z.unsqueeze(1) + c.unsqueeze(0)
    wx = wz.unsqueeze(1) * wz.unsqueeze(0)
    exact_m1 = float((wx * torch.relu(x)).sum())
    exact = float((wx * torch.relu(x) ** 2).sum()) - exact_m1**2
    m = float((wx * x).sum())
    v = float((wx * (x - m) ** 2).sum())
    k3 = float((wx * (x - m) ** 3).sum())
    p, w = skewed_points(m, v, k3, False)
    m1 = float((w * torch.relu(p)).sum())
    got = float((w * torch.relu(p) ** 2).sum()) - m1 * m1
    g, wg = gaussian_points(m, v)
    gm1 = float((wg * torch.relu(g)).sum())
    gauss = float((wg * torch.relu(g) ** 2).sum()) - gm1 * gm1
    assert got == pytest.approx(exact, rel=0.015)
    assert abs(gauss / exact - 1) > 0.05
