"""Rows whose channels move together: the spread of a row around its own mean.

A softmax over the channels of a row (class logits) does not see a part that every
channel of the row shares: softmax(s + c 1) = softmax(s). How peaked it is depends on the
spread of one row around its own mean,

    spread = E[ mean_c (x_c - xbar)^2 ],   xbar = mean_c x_c   (a row: one position of one sample),

not on each channel's variance over samples. For independent channels the two differ by
the factor 1 - 1/n. For a layer whose weight rows are all equal (every output unit
computes the same sum, as a constant initialisation makes it) the spread is 0 however
large the variance: the softmax is uniform, where independent logits of that variance
would saturate it.

Forward. A dense map y = W x + b of inputs x_j independent across channels (variance
v_j) gives, with wbar_j = mean_i W_ij the mean of the weight rows,

    y_i - ybar = sum_j (W_ij - wbar_j) (x_j - mu_j) + (E[y_i] - mean_i E[y_i])
    spread     = (1/n) sum_ij (W_ij - wbar_j)^2 v_j + spread of the channel means

and a convolution the same with each tap t weighted by its share of valid positions
(N_t / N_out). An elementwise function and a pooling over positions keep a spread of 0
(channels that hold the same value keep holding the same value); other ops leave it
untracked (None).

Backward. The softmax's backward p (g - <p, g>) sums to 0 along the row: the gradient
has no power along the row's mean direction (``Grad.dm`` = E[g^2]). Through a dense map
W^T g = (W - 1 wbar^T)^T g when 1^T g = 0, so

    E[(dL/dx_j)^2] = sum_i (W_ij - wbar_j)^2 E[g_i^2]

-- 0 below a layer with equal rows (up to rounding), as real autograd gives. A gradient with a
fraction f = dm / E[g^2] of that power missing mixes the two maps: (1 - f) W^2 + f Wc^2.

The weights are centred as (W - W_0) - mean_i (W - W_0), W_0 the first row: the same
value, and exactly 0 when the rows are equal (the plain W - mean_i W leaves a rounding
residue of 1e-9 that a variance of 1e30 would turn into a spread). Everything is
computed on first use: most rows never reach a softmax over their channels.
"""

from __future__ import annotations

from typing import Callable

import torch


def centred(weight: torch.Tensor) -> torch.Tensor:
    """The weight (C_out, C_in, ...) in float64 minus the mean of its rows (dim 0)."""
    w = weight.detach().double()
    d = w - w[:1]
    return d - d.mean(0, keepdim=True)


def equal_rows(weight: torch.Tensor) -> bool:
    """Whether every row (dim 0) of the weight is the same (first and last compared
    before the whole)."""
    w = weight.detach()
    return w.shape[0] < 2 or (torch.equal(w[0], w[-1]) and bool((w == w[:1]).all()))


class Spread:
    """A row's spread, computed on first use: :meth:`value` (float, or None when not
    tracked) and the cheaper :meth:`is_zero` (every channel of a row holds the same value)."""

    def __init__(self, value: Callable[[], float | None], is_zero: Callable[[], bool]) -> None:
        self._value, self._is_zero = value, is_zero
        self._cache: dict[str, object] = {}

    def value(self) -> float | None:
        if "value" not in self._cache:
            self._cache["value"] = 0.0 if self.is_zero() else self._value()
        return self._cache["value"]

    def is_zero(self) -> bool:
        if "zero" not in self._cache:
            self._cache["zero"] = bool(self._is_zero())
        return self._cache["zero"]


def dense(
    weight: torch.Tensor, bias: torch.Tensor | None, var_in: torch.Tensor, mean_out: torch.Tensor,
    taps: torch.Tensor | None = None, n_out_pos: int = 1,
) -> Spread:
    """The spread of y = W x + b (see the module docstring): ``weight`` (C_out, C_in, *k),
    ``var_in`` the inputs' per-channel variances, ``mean_out`` the per-channel output
    means, ``taps`` the count of output positions at which each kernel tap reads a real
    input (None for a linear layer) out of ``n_out_pos``. The spread is 0 when the rows
    of W are equal and so are the biases (whatever the input); the computed means of
    equal rows may differ in their last bit, so that is decided on the weights."""

    def value() -> float:
        sq = centred(weight).pow(2).sum(0)  # (C_in, *k)
        if taps is not None:
            sq = sq.reshape(sq.shape[0], -1) @ taps.double() / n_out_pos
        fluct = float(sq.reshape(-1) @ var_in.double()) / weight.shape[0]
        return fluct + (float(mean_out.var(unbiased=False)) if mean_out.numel() > 1 else 0.0)

    def zero() -> bool:
        return equal_rows(weight) and (bias is None or bool((bias == bias.reshape(-1)[0]).all()))

    return Spread(value, zero)


def kept_if_equal(source, axis: int | None) -> Spread:
    """The spread of an op that keeps equal channels equal, along its channel axis
    ``axis``: 0 when the source's along the same axis is 0, untracked otherwise."""

    def zero() -> bool:
        return source.axis == axis and source.equal_rows()

    return Spread(lambda: None, zero)
