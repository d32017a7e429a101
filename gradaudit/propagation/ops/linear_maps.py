"""Fixed linear maps without weights: interpolation / upsampling and pixel (un)shuffle."""

from __future__ import annotations

import torch

from gradaudit.propagation.ops.base import SAMPLER_SEED, Ctx, Effect, handles, make_stats
from gradaudit.propagation.ops.layout import layout


@handles("interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle", "pixel_unshuffle")
def linear_map(ctx: Ctx) -> Effect:
    """Any fixed linear map L without weights (interpolation, pixel shuffle).

    For independent inputs with mean mu and variance v: E[(Lx)_i^2] = v ||L_i||^2 +
    mu^2 (L 1)_i^2 and gain = ||L||_F^2 / numel(in). ||L||_F^2 = E||L z||^2 for z ~ N(0, I)
    is measured on a few single-channel probes (Hutchinson), which is exact in
    expectation and cheap because L acts on each channel alike.
    """
    ref = ctx.first_ref()
    x = ctx.stat(ref)
    x_meta = ctx.meta(ref)
    fn = ctx.node.fn
    shape = list(x_meta.shape)
    if ctx.node.op.startswith("pixel") or len(shape) < 3:
        return layout(ctx)
    probes = 8
    shape[0], shape[1] = probes, 1
    gen = torch.Generator().manual_seed(SAMPLER_SEED)
    z = torch.randn(*shape, generator=gen)
    args = [z if a is ref else a for a in ctx.node.args]
    kwargs = {k: (z if a is ref else a) for k, a in ctx.node.kwargs.items()}
    with torch.no_grad():
        lz = fn(*args, **kwargs)
        args1 = [torch.ones_like(z[:1]) if a is z else a for a in args]
        kwargs1 = {k: (torch.ones_like(z[:1]) if a is z else a) for k, a in kwargs.items()}
        l1 = fn(*args1, **kwargs1)
    fro_per_out = float(lz.double().pow(2).mean())  # ||L_i||^2 averaged over outputs
    mean_row = l1.double()
    m2 = x.var * fro_per_out + x.mean**2 * float(mean_row.pow(2).mean())
    gain = fro_per_out * lz[0].numel() / z[0].numel()
    return Effect([make_stats(x.mean * float(mean_row.mean()), m2)], [(ref.name, 0, 0, gain)])
