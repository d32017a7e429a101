"""Per-channel bookkeeping: where the channel axis goes, and channel-aware gains.

A handler's backward gain is a plain float (every element of the input gets ``gain *
E[(dL/dy)^2]``) or one of the channel-aware gains below, which map the per-channel
gradient second moments of an output (a vector over its channel axis) to those of an
input. :func:`apply_gain` applies any of them; when either side does not track
channels, the result collapses to the scalar average, which is exact for the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Diag:
    """Channel layout preserved: g2_in[c] = k[c] * g2_out[c] (k a float or a vector)."""

    k: Any
    axis: int | None = None


@dataclass(frozen=True)
class Mat:
    """Channels mixed: g2_in[c'] = sum_c M[c, c'] g2_out[c], M of shape (C_out, C_in)."""

    m: torch.Tensor
    axis: int | None = None


@dataclass(frozen=True)
class Regroup:
    """Channel c of the input became r consecutive output channels (``flatten`` after a
    conv): g2_in[c] = mean of g2_out[c r : (c + 1) r]."""

    r: int
    axis: int | None = None


@dataclass(frozen=True)
class Place:
    """The output is channels [start, stop) of the input (``split`` along channels):
    g2_in[start:stop] = g2_out, zero elsewhere."""

    start: int
    stop: int
    n_in: int
    axis: int | None = None


@dataclass(frozen=True)
class Take:
    """The input is channels [start, stop) of the output (``cat`` along channels):
    g2_in = g2_out[start:stop]."""

    start: int
    stop: int
    axis: int | None = None


@dataclass(frozen=True)
class AtMax:
    """Max pooling's gain: like ``Diag(k_ratio)``, but the gradient lands only on each
    window's arg-max, so where it meets an elementwise function upstream, phi' must be
    averaged over the distribution of the maximum of ``window`` values, not of a typical
    value (the engine does that for fused groups)."""

    k: float
    window: int
    axis: int | None = None


def _vec(out_g2: float, out_vec: torch.Tensor | None, n: int) -> torch.Tensor:
    if out_vec is not None and out_vec.numel() == n:
        return out_vec
    return torch.full((n,), float(out_g2), dtype=torch.float64)


def apply_gain(
    gain: Any, out_g2: float, out_vec: torch.Tensor | None, n_in: int | None, in_axis: int | None = None
) -> float | torch.Tensor:
    """Contribution of one output's gradient to one input.

    ``n_in`` / ``in_axis`` describe the input's tracked channels (None when it tracks
    none). A gain's ``axis`` names the input axis its vector refers to (None: the
    input's own channel axis). The result is a vector over the input's channels when
    both agree, else its scalar average.
    """
    if isinstance(gain, (int, float)):
        return float(gain) * out_g2
    if isinstance(gain, (Diag, AtMax)):
        k = gain.k
        if isinstance(k, torch.Tensor):
            v = k * _vec(out_g2, out_vec, k.numel())
        elif out_vec is not None:
            v = float(k) * out_vec
        else:
            return float(k) * out_g2
    elif isinstance(gain, Mat):
        v = gain.m.t() @ _vec(out_g2, out_vec, gain.m.shape[0])
    elif isinstance(gain, Regroup):
        if out_vec is None:
            return out_g2
        v = out_vec.reshape(-1, gain.r).mean(1)
    elif isinstance(gain, Place):
        v = torch.zeros(gain.n_in, dtype=torch.float64)
        v[gain.start : gain.stop] = _vec(out_g2, out_vec, gain.stop - gain.start)
    elif isinstance(gain, Take):
        if out_vec is None:
            return out_g2
        v = out_vec[gain.start : gain.stop]
    else:  # pragma: no cover - handlers only emit the types above
        raise TypeError(f"unknown gain {gain!r}")
    if n_in is not None and v.numel() == n_in and (gain.axis is None or gain.axis == in_axis):
        return v
    return float(v.mean()) if v.numel() else 0.0


def normalize_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def reshaped_axis(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> tuple[int, int] | None:
    """Where channel ``axis`` of ``in_shape`` lands after a reshape to ``out_shape``.

    Returns ``(out_axis, r)``: r = 1 when the axis survives as is, r > 1 when each input
    channel became r consecutive output channels (its block was merged with the dims
    after it, as ``flatten`` does). None when channels get mixed in another way.
    """
    c = in_shape[axis]
    pre = math.prod(in_shape[:axis])
    post = math.prod(in_shape[axis + 1 :])
    run = 1
    for k, size in enumerate(out_shape):
        if run == pre:
            rest = math.prod(out_shape[k + 1 :])
            if size == c and rest == post:
                return k, 1
            if size % c == 0 and size > c and post % (size // c) == 0 and rest == post // (size // c):
                return k, size // c
        run *= size
        if run > pre:
            break
    return None


def permuted_axis(axis: int, dims: Sequence[int], ndim: int) -> int:
    dims = [normalize_axis(d, ndim) for d in dims]
    return dims.index(axis)


def broadcast_channel_vector(t: torch.Tensor, out_shape: Sequence[int], axis: int) -> torch.Tensor | None:
    """If constant tensor ``t`` varies only along ``axis`` of ``out_shape`` once
    broadcast (a bias or per-channel scale), its values as a vector over that axis."""
    nd = len(out_shape)
    if t.dim() > nd:
        return None
    shape = [1] * (nd - t.dim()) + list(t.shape)
    for d, size in enumerate(shape):
        if d != axis and size != 1:
            return None
    c = out_shape[axis]
    if shape[axis] not in (1, c):
        return None
    vec = t.detach().double().reshape(-1)
    return vec.expand(c).clone() if vec.numel() == 1 else vec
