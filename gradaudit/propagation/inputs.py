"""Statistics of the example inputs, the starting point of the propagation.

A floating input is described by what its example tensor holds, not by a unit
Gaussian: a recurrent model whose initial state is zeros, a diffusion model's timesteps
in [0, 1000), a conditioning vector set to one value for the whole batch all start the
propagation from their real moments. Per input:

- the channel axis: 1 for images (4-D and 5-D), the last axis otherwise; per-channel
  mean and second moment when each channel holds at least ``MIN_PER_CHANNEL`` values
  (fewer give noisy estimates: the tensor-wide moments are used instead);
- the position axes (images: the spatial axes; 3-D (batch, tokens, features): axis 1)
  and the covariance of two positions of one sample, from the variance of the
  per-sample means over the batch (a random-effects estimate: Var(sample mean) = cov +
  (v - cov) / p, Searle et al. 1992), when the batch holds at least two samples;
- ``positive`` when every value is >= 0 (a Gamma, not a Gaussian, then describes the
  values to an elementwise op).

Inputs without real values (meta or fake tensors, integer ids) keep the default.
"""

from __future__ import annotations

from typing import Any

import torch

from gradaudit.ir import Graph, Stats

#: Values per channel below which channel statistics are too noisy to use.
MIN_PER_CHANNEL = 16
#: At most this many values are read from one input (whole samples, from the start).
MAX_VALUES = 1 << 22


def observed(x: Any) -> Stats | None:
    """Stats of one example tensor, or None when it holds no usable real values."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    if x.device.type == "meta" or type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return None  # fake or subclassed tensors carry no real values
    x = x.detach()
    if x.dim() >= 2 and x.numel() > MAX_VALUES:
        x = x[: max(1, MAX_VALUES * x.shape[0] // x.numel())]
    x = x.double().cpu()
    if not bool(torch.isfinite(x).all()):
        return None
    nd = x.dim()
    axis = (1 if nd >= 4 else nd - 1) if nd >= 2 else None
    pos = tuple(range(2, nd)) if nd >= 4 else ((1,) if nd == 3 else None)
    positive = bool((x >= 0).all()) and float(x.var()) > 0 if x.numel() > 1 else False
    per = x.numel() // x.shape[axis] if axis is not None else x.numel()
    if axis is None or per < MIN_PER_CHANNEL:
        s = Stats(mean=float(x.mean()), m2=float(x.pow(2).mean()))
        s.positive = positive
        return s
    moved = x.movedim(axis, -1)  # (..., C): for images (B, H, W, C); for tokens (B, T, C)
    flat = moved.reshape(-1, moved.shape[-1])
    mean, m2 = flat.mean(0), flat.pow(2).mean(0)
    cov = None
    if pos is not None and x.shape[0] >= 2:
        p = flat.shape[0] // x.shape[0]
        if p > 1:
            per_sample = moved.reshape(x.shape[0], p, -1).mean(1)  # (B, C)
            var = (m2 - mean * mean).clamp_min(0.0)
            between = (per_sample - mean).pow(2).mean(0)
            cov = ((between - var / p) / (1 - 1 / p)).maximum(-var / (p - 1)).minimum(var)
    s = Stats.per_channel(axis, mean, m2, cov, pos if cov is not None else None)
    s.positive = positive
    return s


def input_statistics(graph: Graph, inputs: Any) -> dict[str, Stats]:
    """``{input node name: Stats}`` for the graph's floating inputs that are single
    tensors with real example values (``inputs``: the example call; each input node's
    argument is named by ``graph.input_args``)."""
    from gradaudit.frontends.signature import ExampleCall

    given = dict(ExampleCall.of(inputs).named())
    out: dict[str, Stats] = {}
    for i, name in enumerate(graph.input_names):
        key = graph.input_args[i] if i < len(graph.input_args) else str(i)
        s = observed(given.get(key))
        if s is not None:
            out[name] = s
    return out
