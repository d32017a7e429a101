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

The expectation over h uses Gauss-Hermite nodes; r_{s'} between its nodes is
interpolated linearly (held constant beyond them). Its nodes are the same as those the
ReLU's own moments use (Gaussian, or the shifted Gamma of a skewed residual sum).
"""

from __future__ import annotations

from functools import lru_cache

import torch

#: Gauss-Hermite nodes for the expectation over the branch h.
H_NODES = 24


@lru_cache(maxsize=2)
def _hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilists' Gauss-Hermite nodes and normalised weights (for z ~ N(0, 1))."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(z, dtype=torch.float64), torch.tensor(w / w.sum(), dtype=torch.float64)


def through_sum(x: torch.Tensor, nodes: torch.Tensor, profile: torch.Tensor, mean_h, var_h) -> torch.Tensor:
    """E_h[r(relu(x) + h)] on nodes ``x`` (N, C), for a profile r given on ascending
    ``nodes`` (M, C) by ``profile`` (M, C) and h ~ N(mean_h, var_h) (scalars or (C,))."""
    z, wz = _hermite(H_NODES)
    mean_h = torch.as_tensor(mean_h, dtype=torch.float64).reshape(-1)
    sd_h = torch.as_tensor(var_h, dtype=torch.float64).clamp_min(0.0).sqrt().reshape(-1)
    v = x.double().clamp_min(0.0)
    t = v.unsqueeze(0) + mean_h + sd_h * z.view(-1, 1, 1)  # (K, N, C)
    k, n, c = t.shape
    at = _interpolate(nodes.double(), profile, t.permute(2, 0, 1).reshape(c, k * n))  # (C, K N)
    return (wz.view(-1, 1, 1) * at.reshape(c, k, n).permute(1, 2, 0)).sum(0)


def after_relu(x: torch.Tensor, w: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[1[s > 0] r_y(s)], r_s) for s on nodes ``x`` (N, C) with weights ``w`` (N,):
    the ReLU's backward gain and the profile of its input's gradient (mean 1)."""
    kept = (x > 0).double() * profile
    gain = w.double() @ kept
    return gain, torch.where(gain > 0, kept / gain.clamp_min(1e-300), torch.ones_like(kept))


def _interpolate(xs: torch.Tensor, ys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(q) per channel: ``xs``, ``ys`` (M, C) with xs ascending along M,
    ``q`` (C, Q); constant beyond the ends."""
    xs_t, ys_t = xs.t().contiguous(), ys.t().contiguous()
    idx = torch.searchsorted(xs_t, q.contiguous()).clamp(1, xs_t.shape[1] - 1)
    x0, x1 = xs_t.gather(1, idx - 1), xs_t.gather(1, idx)
    y0, y1 = ys_t.gather(1, idx - 1), ys_t.gather(1, idx)
    frac = ((q - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0.0, 1.0)
    return y0 + frac * (y1 - y0)
