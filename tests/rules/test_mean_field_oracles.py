"""Mean-field numbers the rules rest on (ORACLES.md; Schoenholz et al., ICLR 2017)."""

import math

import pytest
import torch

from gradaudit.propagation.moments import critical_weight_variance, depth_scale, expectations


def tanh_fixed_point(sw2: float, sb2: float = 0.0, iters: int = 100, q: float = 1.0) -> float:
    """q* of the length map q = sw2 E[tanh(sqrt(q) z)^2] + sb2, iterated from ``q``."""
    for _ in range(iters):
        q = sw2 * expectations(torch.tanh, 0.0, q).m2 + sb2
    return q


@pytest.mark.parametrize("sw2, xi", [(0.8, 4.5), (0.9, 9.5), (0.95, 19.5), (0.99, 99.5)])
def test_tanh_depth_scale(sw2, xi):
    """s_b = 0, s_w^2 < 1: the length map contracts to q* = 0 (tanh(x)^2 < x^2), where
    chi_1 = s_w^2 E[tanh'(0)^2] = s_w^2, so xi = -1 / ln(s_w^2): 4.48, 9.49, 19.5, 99.5."""
    for q in (1.0, 0.1, 0.01):
        assert tanh_fixed_point(sw2, iters=1, q=q) < q
    chi = sw2 * expectations(torch.tanh, 0.0, 0.0).d2
    assert depth_scale(chi) == pytest.approx(xi, abs=0.05)


@pytest.mark.parametrize("chi", [0.5, 0.9, 1.1, 2.0])
def test_depth_scale_is_positive_on_both_sides(chi):
    """xi = 1 / |ln chi_1|: the layers over which the gradient changes by e, for both
    vanishing (chi < 1) and exploding (chi > 1)."""
    assert depth_scale(chi) == pytest.approx(1 / abs(math.log(chi)))


def test_depth_scale_at_criticality_is_infinite():
    assert depth_scale(1.0) == math.inf


@pytest.mark.parametrize(
    "sb2, sw2, q_star",
    [(0.0, 1.0, 0.0), (0.01, 1.4242, 0.2733), (0.05, 1.7610, 0.5700), (0.10, 1.9861, 0.8058)],
)
def test_tanh_critical_line(sb2, sw2, q_star):
    """chi_1 = 1 on the tanh critical line (ORACLES.md [calc])."""
    got_sw2, got_q = critical_weight_variance(torch.tanh, sb2)
    assert got_sw2 == pytest.approx(sw2, abs=2e-4)
    assert got_q == pytest.approx(q_star, abs=2e-4)


@pytest.mark.parametrize("sb2", [0.01, 0.05, 0.10])
def test_critical_point_is_a_fixed_point_with_unit_chi(sb2):
    """Independent check: iterate the length map at the returned s_w^2 and measure chi_1."""
    sw2, q = critical_weight_variance(torch.tanh, sb2)
    q_iter = tanh_fixed_point(sw2, sb2, iters=60, q=1.5 * q)
    assert q_iter == pytest.approx(q, rel=1e-3)
    assert sw2 * expectations(torch.tanh, 0.0, q_iter).d2 == pytest.approx(1.0, abs=1e-3)


def test_relu_critical_at_two():
    """chi_1 = s_w^2 E[relu'^2] = s_w^2 / 2: He's s_w^2 = 2."""
    sw2, _ = critical_weight_variance(torch.relu, 0.0)
    assert sw2 == pytest.approx(2.0, abs=1e-3)
