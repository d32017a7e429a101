"""Sign persistence along a ReLU residual stream: where a value is large and positive,
the next blocks' sums stay positive, and the gradient lives there.

In ``y = relu(s)`` followed by ``s' = y + h`` and ``y' = relu(s')`` (a residual block
whose sum goes through a ReLU: ResNet's ``relu(out + identity)``), the gradient that
reaches y through the sum is g_{s'} = 1[s' > 0] g_{y'}. It is zero where s' <= 0, and
s' = s + h > 0 is more likely where s > 0 than elsewhere; a large positive s keeps the
masks of many following blocks open. An elementwise backward that takes the mask
independent of the gradient, E[1[s > 0] g^2] = P(s > 0) E[g^2], loses that factor at
every block: 0.45 decades at the stem of a 32-block ResNet without normalization.

The gradient is therefore described, at a ReLU's input s, by its *value profile*

    r_s(t) = E[g_s^2 | s = t] / E[g_s^2]          (mean 1 under s's law)

on the quadrature nodes of s's law. Two maps carry it, exact when the branch h is
independent of the stream at a position (a convolution or a normalization of the
block's branch; Gaussian, per-channel mean mu_h and variance v_h) and the gradient
that comes through other paths (the branch's convolutions, which mix positions) is
independent of the value there:

    through the ReLU      E[g_s^2 | s = t] = 1[t > 0] E[g_y^2 | s = t]
    through the sum       E[g_{s'}^2 | s = t] = E_h[ E[g_{s'}^2 | s' = relu(t) + h] ]

and the gradient at y is the sum of the parts from each path, so its profile is their
E[g^2]-weighted mean (1 for parts from other paths). Since s' depends on s only
through its value (a Markov chain along the stream), the profile carries the whole
chain of later blocks, not only the next one. The ReLU's backward then reads
E[g_s^2] = E[1[s > 0] r_y(s)] E[g_y^2] instead of P(s > 0) E[g_y^2].

The profile lives on a coarse version of the nodes the ReLU's own moments use
(Gaussian, or the shifted Gamma of a skewed residual sum): :data:`BINS` bins of
consecutive nodes, each at its weighted mean (:func:`coarse`). The ReLU's gain is
P(s > 0) (on the fine nodes, as without a profile) times E[r_y(s) | s > 0] on the coarse
ones. The expectation over h uses :data:`H_NODES` Gauss-Hermite nodes; r_{s'} between
its nodes is interpolated linearly (held constant beyond them).
"""

from __future__ import annotations

from functools import lru_cache

import torch

#: Gauss-Hermite nodes for the expectation over the branch h.
H_NODES = 12
#: Bins of the coarse nodes a profile lives on.
BINS = 32


def coarse(x: torch.Tensor, w: torch.Tensor, bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes (B, C), weights (B,)): ``bins`` runs of consecutive nodes of ``x`` (N, C),
    ascending along N with weights ``w`` (N,), each at its weighted mean (the last bin
    takes the remainder)."""
    n = x.shape[0]
    size = max(n // bins, 1)
    idx = torch.clamp(torch.arange(n) // size, max=max(n // size - 1, 0))
    wd = w.double()
    weights = torch.zeros(int(idx[-1]) + 1, dtype=torch.float64).index_add_(0, idx, wd)
    sums = torch.zeros(weights.shape[0], x.shape[1], dtype=torch.float64).index_add_(0, idx, wd.unsqueeze(1) * x.double())
    return sums / weights.clamp_min(1e-300).unsqueeze(1), weights


@lru_cache(maxsize=2)
def _hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilists' Gauss-Hermite nodes and normalised weights (for z ~ N(0, 1))."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(z, dtype=torch.float64), torch.tensor(w / w.sum(), dtype=torch.float64)


def through_sum(x: torch.Tensor, nodes: torch.Tensor, profile: torch.Tensor, mean_h, var_h) -> torch.Tensor:
    """E_h[r(relu(x) + h)] on nodes ``x`` (N, C), for a profile r given on ascending
    ``nodes`` (M, C) by ``profile`` (M, C) and h ~ N(mean_h, var_h) (scalars or (C,)).
    Float32 inside (a profile is a ratio of order 1), float64 out."""
    z, wz = _hermite(H_NODES)
    c = x.shape[1]
    mean_h = torch.as_tensor(mean_h, dtype=torch.float64).reshape(-1).expand(c)
    sd_h = torch.as_tensor(var_h, dtype=torch.float64).clamp_min(0.0).sqrt().reshape(-1).expand(c)
    shift = (mean_h.unsqueeze(1) + sd_h.unsqueeze(1) * z.unsqueeze(0)).float()  # (C, K)
    t = x.t().float().clamp_min(0.0).unsqueeze(1) + shift.unsqueeze(2)  # (C, K, N)
    at = _interpolate(nodes.t().float(), profile.t().float(), t.reshape(c, -1)).view(t.shape)
    return (wz.float().view(1, -1, 1) * at).sum(1).t().double()


def after_relu(x: torch.Tensor, w: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[r_y(s) | s > 0], r_s) for s on nodes ``x`` (N, C) with weights ``w`` (N,): the
    factor the ReLU's backward gain P(s > 0) takes, and the profile of its input's
    gradient (mean 1; 1 where s is never positive)."""
    pos = (x > 0).double()
    kept = pos * profile
    gain = w.double() @ kept
    p = w.double() @ pos
    r_s = torch.where(gain > 0, kept / gain.clamp_min(1e-300), torch.ones_like(kept))
    return torch.where(p > 0, gain / p.clamp_min(1e-300), torch.ones_like(gain)), r_s


def _interpolate(xs: torch.Tensor, ys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(q) per channel: ``xs``, ``ys`` (C, M) with xs ascending along M,
    ``q`` (C, Q); constant beyond the ends."""
    xs, ys = xs.contiguous(), ys.contiguous()
    slope = (ys[:, 1:] - ys[:, :-1]) / (xs[:, 1:] - xs[:, :-1]).clamp_min(1e-30)
    idx = (torch.searchsorted(xs, q) - 1).clamp(0, xs.shape[1] - 2)
    x0 = xs.gather(1, idx)
    return ys.gather(1, idx) + slope.gather(1, idx) * (q.clamp(xs[:, :1], xs[:, -1:]) - x0)
