"""torchvision's Swin Transformer functions, which torch.fx keeps as leaves:
``shifted_window_attention`` (V1 and V2) and ``_patch_merging_pad``.

Their inputs are channels-last maps (B, H, W, C) whose tokens are far from independent:
every attention averages its window's values, so its output carries a part shared by the
window's tokens (and, once a window covers the whole map, by every token of the sample),
and the biases add a part shared by all samples. A Swin V2 block normalises the
attention's output before the residual sum (res-post-norm, Liu et al. 2022), so the
small attention output's shared part becomes a large part of the stream, and the next
attention reads it: what the blocks pass on is mostly that shared part. The handlers
below keep it: the per-channel means, the coherent covariance of the positions of one
sample (:class:`~gradaudit.ir.Stats`), and the gradient's coherent part.
"""

from __future__ import annotations

import math

import torch

from gradaudit.ir import Ref, Stats
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import SAMPLER_SEED, Ctx, Effect, Unhandled, handles, make_stats

#: the most samples drawn for the windowed attention's moments (:func:`_samples`)
SAMPLES = 8


def _structured_input(s: Stats, shape: tuple[int, ...], samples: int, gen: torch.Generator) -> torch.Tensor:
    """Draws of a (B, H, W, C) map with the statistics ``s``: per channel c,

        x_bhwc = mu_c + sqrt(s_c) z_bc + sqrt(v_c - s_c) e_bhwc,   z, e ~ N(0, 1)

    mu the channel's mean, v its variance and s the part of it shared by the positions
    of a sample (a random-effects model; 0 when the positions (1, 2) are not tracked, and
    a negative one, what a batch normalization leaves, taken as 0). A part shared by the
    samples of the batch (``xcov``) changes no sample's attention and is left out."""
    c = shape[-1]
    axis = len(shape) - 1
    base = s if s.has_channels and s.axis == axis else s.scalar()
    mean, var = base.channels(axis, c)
    tracked = s.pos is not None and set(s.pos) == {1, 2}
    cov = base.coherent(axis if base.has_channels else None, c) if tracked else torch.zeros(c, dtype=torch.float64)
    cov = cov.clamp(min=0.0).minimum(var)
    n = (samples, *shape[1:])
    shared = torch.randn(samples, *([1] * (len(shape) - 2)), c, generator=gen, dtype=torch.float64)
    own = torch.randn(n, generator=gen, dtype=torch.float64)
    return (mean + cov.sqrt() * shared + (var - cov).sqrt() * own).float()


def _coherent(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-channel mean, E[t^2], coherent covariance) of a (B, H, W, C) sample: with
    m_bc the mean over the N positions of sample b, Var_b(m_bc) = s_c + (v_c - s_c) / N,
    so s_c = (N Var_b(m_bc) - v_c) / (N - 1)."""
    td = t.detach().double()
    b = td.shape[0]
    n = math.prod(td.shape[1:-1])
    flat = td.reshape(b, n, td.shape[-1])
    mean = flat.mean((0, 1))
    m2 = flat.pow(2).mean((0, 1))
    var = (m2 - mean * mean).clamp_min(0.0)
    per = flat.mean(1)
    between = (per - mean).pow(2).sum(0) / max(b - 1, 1)
    cov = (n * between - var) / max(n - 1, 1) if n > 1 else var
    return mean, m2, cov


def _gradient_parts(g: torch.Tensor) -> tuple[float, float]:
    """(E[g^2], coherent E[g_i g_j] of two positions of one sample) of a (B, H, W, C)
    gradient of mean zero."""
    gd = g.detach().double()
    b, c = gd.shape[0], gd.shape[-1]
    n = math.prod(gd.shape[1:-1])
    flat = gd.reshape(b, n, c)
    g2 = float(flat.pow(2).mean())
    per = float(flat.mean(1).pow(2).mean())
    s = (n * per - g2) / max(n - 1, 1) if n > 1 else g2
    return g2, s


@handles("shifted_window_attention")
def shifted_window_attention(ctx: Ctx) -> Effect:
    """torchvision's ``shifted_window_attention(input, qkv_weight, proj_weight,
    relative_position_bias, window_size, num_heads, shift_size, ..., logit_scale)``:
    multi-head self-attention inside (shifted) windows of a (B, H, W, C) map, with a
    relative position bias on the logits (Liu et al. 2021) and, for Swin V2, cosine
    logits tau cos(q, k) with a learned per-head tau (Liu et al. 2022).

    The softmax of cosine logits over a window, and a window mask under the shift, have
    no closed form; the op runs once, with a fixed seed, on draws of its input that keep
    the tracked per-channel means and the part shared by the positions of a sample
    (:func:`_structured_input`). A shared part of v reaches the output whole (a softmax
    row sums to 1) while a token's own part is averaged down by E[sum_t P_st^2], so

        o = mu_o + a_o + e_o:   E[o^2] = mu_o^2 + s_o + f_o

    is read off the draws per channel (:func:`_coherent`), and the output keeps its
    positions (1, 2) and their coherent covariance s_o. Backward, the gradient's own
    part (g - s) and its part s shared by the positions of a sample take different
    routes (A^T averages the first, passes the second whole): each is measured with
    its own cotangent, N(0, 1) per element (giving E[g_in^2] = a_f, coherent part s_f)
    and N(0, 1) per (sample, channel) repeated over the positions (a_c, s_c), so

        g_in = a_f (g - s) + a_c s,   s_in = s_f (g - s) + s_c s

    averaged over the channels (qkv and proj mix them). The relative position bias,
    shared by every window of every sample, collects the logits' gradient summed over
    them: its gain is measured the same way and scaled from the draws' batch to the
    model's (independent samples add in power).
    """
    x_ref = ctx.arg(0, "input")
    if not isinstance(x_ref, Ref):
        raise Unhandled("the input is a constant")
    meta = ctx.meta(x_ref)
    if len(meta.shape) != 4:
        raise Unhandled("input is not a (B, H, W, C) map")
    fn = ctx.node.fn
    if fn is None:
        raise Unhandled("the node has no callable")
    weight = ctx.const(ctx.arg(1, "qkv_weight"))
    if weight is None:
        raise Unhandled("the qkv weight is not a parameter")
    like = {"dtype": weight.dtype if weight.is_floating_point() else torch.float32, "device": weight.device}
    s = ctx.stat(x_ref)
    gen = torch.Generator().manual_seed(SAMPLER_SEED)
    samples = _samples(meta.shape)
    x = _structured_input(s, tuple(meta.shape), samples, gen).to(**like).requires_grad_(True)
    leaves = [(x_ref, x)]

    def value(ref):
        """The draw of the input, a draw of the bias from its statistics, or a constant."""
        if ref is x_ref:
            return x
        const = ctx.const(ref)
        if const is not None:
            return const
        if ref is not ctx.arg(3, "relative_position_bias"):
            raise Unhandled(f"'{ref.name}' is an activation, not a parameter")
        bs = ctx.stat(ref)
        draw = bs.mean + math.sqrt(bs.var) * torch.randn(ctx.meta(ref).shape, generator=gen, dtype=torch.float64)
        leaves.append((ref, draw.to(**like).requires_grad_(True)))
        return leaves[-1][1]

    args = [value(a) if isinstance(a, Ref) else a for a in ctx.node.args]
    kwargs = {k: value(a) if isinstance(a, Ref) else a for k, a in ctx.node.kwargs.items()}
    tensors = [t for _, t in leaves]
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # dropout's masks leave the global RNG alone
            y = fn(*args, **kwargs)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise Unhandled("output is not a map of the input's shape")
            cot_own = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(**like)
            cot_shared = torch.randn(y.shape[0], 1, 1, y.shape[-1], generator=gen, dtype=torch.float64).to(**like).expand(y.shape)
            own = torch.autograd.grad(y, tensors, cot_own, retain_graph=True, allow_unused=True)
            shared = torch.autograd.grad(y, tensors, cot_shared, allow_unused=True)
    except RuntimeError as exc:  # weights on the meta device, a dtype the op does not run in
        raise Unhandled(f"the op cannot run on sampled inputs: {exc}") from exc
    mean, m2, cov = _coherent(y)
    c = meta.shape[-1]
    out = Stats.per_channel(3, mean, m2, cov, (1, 2))
    a_f, s_f = _gradient_parts(own[0])
    a_c, s_c = _gradient_parts(shared[0])
    # rows: the input gradient's E[g^2], coherent part, cross-sample part; columns: the
    # output gradient's (g, s, x), g - s through the first cotangent, s through the second
    tri = torch.tensor([[a_f, a_c - a_f, 0.0], [s_f, s_c - s_f, 0.0], [0.0, 0.0, s_c]], dtype=torch.float64)
    # qkv and proj mix the channels: every input channel gets the output channels' average
    gains = [(x_ref.name, 0, 0, channels.Tri(tri, axis=3, mat=_average(c, c)))]
    for (ref, _), g_own, g_shared in list(zip(leaves, own, shared))[1:]:
        # the bias collects the logits' gradient of every window of every sample: the
        # samples' contributions are independent, so its power is that of the model's
        # batch, not of the draws
        per = meta.shape[0] / samples
        b_f = per * float(g_own.double().pow(2).mean()) if g_own is not None else 0.0
        b_c = per * float(g_shared.double().pow(2).mean()) if g_shared is not None else 0.0
        bs = ctx.stat(ref)
        n_b = bs.ch_mean.numel() if bs.has_channels else 1
        only = torch.tensor([[b_f, b_c - b_f, 0.0], [0.0] * 3, [0.0] * 3], dtype=torch.float64)
        gains.append((ref.name, 0, 0, channels.Tri(only, axis=bs.axis if bs.has_channels else None, mat=_average(c, n_b))))
    return Effect([out], gains)


def _average(c_out: int, c_in: int) -> torch.Tensor:
    """The channel map that gives every input channel the average over the output's."""
    return torch.full((c_out, c_in), 1.0 / c_out, dtype=torch.float64)


def _samples(shape) -> int:
    """Draws for the windowed attention: the model's batch, or more (up to
    :data:`SAMPLES`, while a draw holds under 2^21 values), since the shared parts are
    read off the spread between samples."""
    per = max(math.prod(shape[1:]), 1)
    return max(shape[0], min(SAMPLES, max(4, -(-(1 << 21) // per))))


@handles("_patch_merging_pad")
def patch_merging_pad(ctx: Ctx) -> Effect:
    """torchvision's ``_patch_merging_pad(x)``: a (B, H, W, C) map padded to even H and W,
    then its four interleaved quarter maps x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2] concatenated along the channels, (B, H/2, W/2, 4C). A layout op: the
    channel statistics repeat four times, positions (and their coherent part) stay those
    of the sample, and every input element reaches exactly one output element (gain 1).
    With odd H or W the padded zeros dilute the moments by the share of real entries.

    Backward, a gradient part shared by the output's positions (s, per output channel)
    lands, for input channel c, on the positions of one parity class only, a quarter of
    them, and the four classes get the parts of four different output channels, which
    are independent: two input positions share it only when they are of the same
    parity (probability 1/4), so s_in = s / 4 (and x likewise) while E[g^2] is kept."""
    x_ref = ctx.first_ref()
    meta = ctx.meta(x_ref)
    if len(meta.shape) != 4:
        raise Unhandled("input is not a (B, H, W, C) map")
    s = ctx.stat(x_ref)
    h, w, c = meta.shape[1:]
    keep = (h * w) / (((h + 1) // 2 * 2) * ((w + 1) // 2 * 2))
    if not (s.has_channels and s.axis == 3):
        out = make_stats(s.mean * keep, s.m2 * keep, (1, 2) if s.pos is not None else None, s.cov * keep)
        return Effect([out], [(x_ref.name, 0, 0, _QUARTERS)])
    cov = s.coherent(3, c).repeat(4) * keep if s.pos is not None else None
    out = Stats.per_channel(3, s.ch_mean.repeat(4) * keep, s.ch_m2.repeat(4) * keep, cov, (1, 2) if s.pos is not None else None)
    return Effect([out], [(x_ref.name, 0, 0, _QUARTERS)])


#: the patch merging's backward: E[g^2] kept, the coherent parts shared by a quarter of
#: the pairs of positions (:func:`patch_merging_pad`)
_QUARTERS = channels.Split(1.0, 0.25, 1.0)
