"""The gradient's value profile along a ReLU residual stream against Monte Carlo."""

from __future__ import annotations

import pytest
import torch

from gradaudit.propagation import persistence
from gradaudit.propagation.moments import channel_points


def _mask_profile(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r(t) = 1[t > 0] / P(s > 0): the profile of a gradient right behind a ReLU."""
    return persistence.after_relu(x, w, torch.ones_like(x, dtype=torch.float64))[1]


@pytest.mark.parametrize("mean_s,mean_h,sd_h", [(0.0, 0.0, 1.0), (0.5, -0.3, 2.0), (-0.4, 0.2, 0.5)])
def test_two_blocks_against_sampling(mean_s, mean_h, sd_h):
    """s ~ N(mean_s, 1), s' = relu(s) + h, s'' = relu(s') + h2: the conditional second
    moment E[1[s > 0] 1[s' > 0] 1[s'' > 0]] / (P(s > 0) E[1[s' > 0] 1[s'' > 0]]) that a
    gradient g = 1[s' > 0] 1[s'' > 0] (two ReLUs behind) carries to the first ReLU."""
    x, w = channel_points(torch.tensor([mean_s]), torch.tensor([1.0]))
    # the profile at s'' and s' on their own quadrature laws (moments from sampling)
    gen = torch.Generator().manual_seed(0)
    s = mean_s + torch.randn(4_000_000, generator=gen, dtype=torch.float64)
    s1 = s.clamp_min(0) + mean_h + sd_h * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    s2 = s1.clamp_min(0) + mean_h + sd_h * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    x2, w2 = channel_points(s2.mean().view(1), s2.var().view(1))
    r2 = _mask_profile(x2, w2)
    x1, w1 = channel_points(s1.mean().view(1), s1.var().view(1))
    _, r1 = persistence.after_relu(x1, w1, persistence.through_sum(x1, x2, r2, mean_h, sd_h**2))
    factor, _ = persistence.after_relu(x, w, persistence.through_sum(x, x1, r1, mean_h, sd_h**2))
    gain = (w.double() @ (x > 0).double()) * factor  # P(s > 0) E[r(s) | s > 0]
    m0, m1, m2 = (s > 0).double(), (s1 > 0).double(), (s2 > 0).double()
    sampled = float((m0 * m1 * m2).mean() / (m1 * m2).mean())
    # s' and s'' are not Gaussian: their quadrature laws carry that error (a few percent)
    assert float(gain) == pytest.approx(sampled, rel=0.03)
    # and independence would say P(s > 0), which is further off
    assert abs(float(gain) - sampled) < 0.5 * abs(float((m0).mean()) - sampled)


def test_no_stream_no_change():
    """A branch that swamps the stream (h with sd 1e6) makes s' independent of s: the
    profile is the plain mask and the gain P(s > 0)."""
    x, w = channel_points(torch.tensor([0.3, -0.2]), torch.tensor([1.0, 2.0]))
    x1, w1 = channel_points(torch.zeros(2), torch.full((2,), 1e12))  # s' ~ h
    factor, _ = persistence.after_relu(x, w, persistence.through_sum(x, x1, _mask_profile(x1, w1), 0.0, 1e12))
    assert torch.allclose(factor, torch.ones_like(factor), rtol=1e-5)


def test_coarse_nodes_keep_the_law_s_mass_and_mean():
    x, w = channel_points(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 4.0]))
    nodes, weights = persistence.coarse(x, w)
    assert nodes.shape == (persistence.BINS, 2) and weights.shape == (persistence.BINS,)
    assert float(weights.sum()) == pytest.approx(float(w.double().sum()), rel=1e-12)
    assert torch.allclose(weights @ nodes, w.double() @ x.double(), rtol=1e-9, atol=1e-12)
    assert bool((nodes[1:] >= nodes[:-1]).all())  # still ascending
