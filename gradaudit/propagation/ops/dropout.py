"""Dropout and stochastic depth (DropPath): inverted random masks in training mode."""

from __future__ import annotations

import torch

from gradaudit.ir import Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import Ctx, Effect, handles, make_stats
from gradaudit.propagation.ops.layout import copy_stats


@handles("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout")
def dropout(ctx: Ctx) -> Effect:
    """Inverted dropout in training mode: y = x * m / (1 - p), m ~ Bernoulli(1 - p).

    E[y] = E[x], E[y^2] = E[x^2] / (1 - p); the gradient is masked and scaled the same
    way, gain 1 / (1 - p). Channels keep their own statistics. Two positions have
    independent masks (E[m_i m_j] = (1 - p)^2): coherent parts pass unscaled. Channel
    dropout (``dropout2d``) draws one mask per sample and channel: E[m_i m_j] = 1 - p
    within a sample, so coherent parts scale by 1 / (1 - p) too.
    """
    p = ctx.attr("p") if ctx.node.kind == "call_module" else ctx.arg(1, "p", 0.5)
    training = ctx.arg(2, "training", True) if ctx.node.kind != "call_module" else ctx.attr("training", True)
    return _inverted_mask(ctx, p, training, shared="sample-channel" if ctx.node.op != "dropout" else None)


@handles("stochastic_depth", "drop_path")
def stochastic_depth(ctx: Ctx) -> Effect:
    """Stochastic depth / DropPath (Huang et al., ECCV 2016): in training mode a whole
    residual branch is dropped per sample (``mode="row"``) or per batch with probability
    p, the kept ones scaled by 1 / (1 - p). Per element that is inverted dropout's mask:
    E[y^2] = E[x^2] / (1 - p), gain 1 / (1 - p) (torchvision's
    ``stochastic_depth(input, p, mode, training)``; timm's ``drop_path(x, drop_prob,
    training, scale_by_keep)``). A sampled estimate would instead drop or keep the whole
    batch at once and read as 0 or 1. One mask per sample is shared by its positions:
    coherent parts scale like the rest.
    """
    if ctx.node.kind == "call_module":
        p, training = ctx.attr("p", ctx.attr("drop_prob", 0.0)), ctx.attr("training", True)
    elif ctx.node.op == "stochastic_depth":
        p, training = ctx.arg(1, "p", 0.0), ctx.arg(3, "training", True)
    else:
        p, training = ctx.arg(1, "drop_prob", 0.0), ctx.arg(2, "training", False)
    return _inverted_mask(ctx, float(p), bool(training), shared="sample")


def _inverted_mask(ctx: Ctx, p: float, training: bool, shared: str | None = None) -> Effect:
    """y = x m / (1 - p). ``shared``: one mask per sample and channel, or per sample,
    instead of one per element."""
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    if not training or p == 0:
        return Effect([copy_stats(x)], [(ref.name, 0, 0, channels.Diag(1.0))])
    if p >= 1:
        return Effect([make_stats(0.0, 0.0)], [(ref.name, 0, 0, 0.0)])
    scale = 1.0 / (1 - p)
    k_s = scale if shared else 1.0
    if x.has_channels:
        mu = x.ch_mean
        cov = (mu * mu + x.coherent(x.axis, mu.numel())) * k_s - mu * mu if x.pos is not None else None
        out = Stats.per_channel(x.axis, x.ch_mean, x.ch_m2 * scale, cov, x.pos)
    else:
        out = make_stats(x.mean, x.m2 * scale, x.pos, (x.mean**2 + x.cov) * k_s - x.mean**2)
    if x.row_var is not None and x.has_channels and shared != "sample":
        # each channel's own mask adds (p / (1 - p)^3) E[x^4] / n^2 to the rows' mean square
        var = (x.ch_m2 - x.ch_mean**2).clamp_min(0.0)
        x4 = 3 * var * var + 6 * var * x.ch_mean**2 + x.ch_mean**4
        out.row_var = x.row_var * scale * scale + p * scale**3 * float(x4.sum()) / x.ch_mean.numel() ** 2
    elif x.row_var is not None:  # one mask u = m / (1 - p)^2 for the whole row: Var(ms u)
        out.row_var = (x.row_var + x.m2 * x.m2) * scale**3 - (x.m2 * scale) ** 2
    out.prof = x.prof
    tri = torch.diag(torch.tensor([scale, k_s, 1.0], dtype=torch.float64))
    return Effect([out], [(ref.name, 0, 0, channels.Tri(tri))])
