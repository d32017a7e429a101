"""Weight layers: ``linear``, convolutions (transposed and grouped, with exact border
effects) and ``embedding``."""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch

from gradaudit.ir import Stats
from gradaudit.propagation import channels, rows
from gradaudit.propagation.ops import chunked
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, as_tuple, handles


def dense_stats(
    x: Stats, in_axis: int, w2: torch.Tensor, wsum: torch.Tensor, bias: torch.Tensor | None, out_axis: int,
    coherent: torch.Tensor | None = None, pos: tuple[int, ...] | None = None, power: torch.Tensor | None = None,
    scale: float = 1.0, coherent_scale: float = 1.0,
) -> Stats:
    """y_c = sum_c' W_cc' x_c' + b_c with independent inputs of per-channel mean mu_c'
    and variance v_c' (He et al. 2015; Glorot & Bengio 2010):

        E[y_c] = sum_c' W_cc' mu_c' + b_c,   Var[y_c] = sum_c' W_cc'^2 v_c'

    ``w2`` / ``wsum`` are the (C_out, C_in) matrices of summed squared / plain weights
    (for a conv: over the kernel taps that read real inputs, per output position). The
    weights are the ones the user actually initialised. ``scale`` divides ``w2``,
    ``wsum`` and ``power`` (a conv's 1 / N_out), ``coherent_scale`` ``coherent``.

    The part s_c' of v_c' shared by all positions of a sample goes through the map the
    layer applies to a constant input (a conv sums its taps first: (sum_t W_t)^2
    instead of sum_t W_t^2; a linear layer acts on one position: W^2 itself). ``power``
    is the average over positions of that map's square, ``coherent`` the square of its
    average (what stays shared by the positions; they differ at a conv's borders):

        Var[y_c] = sum_c' W2_cc' (v_c' - s_c') + sum_c' Pow_cc' s_c',  s_out = C s
    """
    mean_in, var_in = x.channels(in_axis, w2.shape[1])
    xcov = None
    if x.xcov != 0.0 and not chunked.pair(wsum, w2):
        xcov = ((coherent if coherent is not None else w2) @ x.cross(in_axis, w2.shape[1])) * (coherent_scale if coherent is not None else scale)
    if chunked.pair(wsum, w2) and power is None and coherent is None:  # one pass over a big weight
        cov_in = x.coherent(in_axis, w2.shape[1]) if pos is not None and x.pos is not None else None
        columns = torch.stack([var_in.double()] + ([cov_in.double()] if cov_in is not None else []), 1)
        mean, sq = chunked.reused_products(wsum, mean_in, columns)
        mean = mean * scale
        if bias is not None:
            mean = mean + bias.detach().double().reshape(-1)
        cov_out = sq[:, 1] * scale if cov_in is not None else None
        return Stats.per_channel(out_axis, mean, sq[:, 0] * scale + mean * mean, cov_out, pos)
    mean = (wsum @ mean_in) * scale
    if bias is not None:
        mean = mean + bias.detach().double().reshape(-1)
    cov_out = None
    if pos is not None and x.pos is not None:
        cov_in = x.coherent(in_axis, w2.shape[1])
        if coherent is None:
            coherent, coherent_scale = w2, scale
        cov_out = (coherent @ cov_in) * coherent_scale
        if power is None:
            var = (w2 @ var_in) * scale
        else:
            var = (w2 @ (var_in - cov_in) + power @ cov_in) * scale
    else:
        var = (w2 @ var_in) * scale
    return Stats.per_channel(out_axis, mean, var + mean * mean, cov_out, pos, xcov)


def _dense_forward(x: Stats, weight: torch.Tensor, bias: torch.Tensor | None) -> Stats:
    """:func:`dense_stats` for a (C_out, C_in) weight on a tensor without channel detail."""
    w = weight.detach().double()
    return dense_stats(x.scalar(), 0, w * w, w, bias, 0, pos=x.pos).scalar()


@handles("linear")
def linear(ctx: Ctx) -> Effect:
    """Fully connected layer, per output feature (see :func:`dense_stats`).

    Inputs whose channels all hold the same value (a spread of 0,
    :mod:`gradaudit.propagation.rows`) add up coherently: Var[y_i] = (sum_j W_ij)^2 Var[x].

    Backward: dL/dx_j = sum_i W_ij dL/dy_i, so E[(dL/dx_j)^2] = sum_i W_ij^2
    E[(dL/dy_i)^2]; with uniform output gradients the gain is ||W||_F^2 / fan_in.
    A gradient whose rows sum to zero goes through the centred weight instead. The
    same map acts at every position, so coherent gradient parts go the same way.
    A linear layer over a position axis (token mixing) mixes positions: coherence is
    dropped there.
    """
    ref = ctx.arg(0, "input")
    weight, bias = ctx.layer_tensor("weight", 1), ctx.layer_tensor("bias", 2)
    if weight is None:
        raise Unhandled("linear with a computed weight")
    x = ctx.stat(ref)
    w, w2 = chunked.weights(weight, getattr(ctx.engine, "reuse", None))
    in_axis = len(ctx.meta(ref).shape) - 1
    pos = x.pos if x.pos is not None and in_axis not in x.pos else None
    w2_fwd = w2
    if x.axis == in_axis and x.equal_rows():
        # inputs whose channels all hold the same value c: y_i = (sum_j W_ij) c, Var[y_i] =
        # (sum_j W_ij)^2 Var[c] -- the matrix W_ij sum_j W_ij has those row sums
        wd = w.double()
        w2_fwd = wd * wd.sum(1, keepdim=True)
    out = dense_stats(x, in_axis, w2_fwd, w, bias, len(ctx.out_meta.shape) - 1, pos=pos)
    if pos is not None and pos == x.pos:  # the same map at every position: relative variances stay
        out.prof = x.prof
    var_in = x.channels(in_axis, w.shape[1])[1]
    out.row_spread = rows.dense(weight, bias, var_in, out.ch_mean)
    centred = cache(lambda: rows.centred(weight).pow(2))
    return Effect([out], [(ref.name, 0, 0, channels.Mat(w2, axis=in_axis, centred=centred))])


@lru_cache(maxsize=1024)
def tap_classes(n_strided: int, n_dense: int, k: int, stride: int, pad: int, dil: int, dense_side: bool) -> tuple[tuple[int, tuple], ...]:
    """Positions grouped by the kernel taps that reach them, along one spatial dim:
    [(number of positions, 0/1 mask over the k taps)].

    On the strided side (a conv's output o), tap t is valid when o*s + t*d - pad reads a
    real input; on the dense side (a conv's input p), when some output o in range reads
    p through t. Interior positions share one class; borders make the others."""
    found: dict[tuple, int] = {}
    for i in range(n_dense if dense_side else n_strided):
        if dense_side:
            mask = tuple(
                int((i + pad - t * dil) % stride == 0 and 0 <= (i + pad - t * dil) // stride < n_strided) for t in range(k)
            )
        else:
            mask = tuple(int(0 <= i * stride + t * dil - pad < n_dense) for t in range(k))
        found[mask] = found.get(mask, 0) + 1
    return tuple((n, m) for m, n in found.items())


@lru_cache(maxsize=512)
def _class_masks(per_dim: tuple[tuple[tuple[int, tuple], ...], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of per-dim classes: masks (K, n_classes) over the flattened kernel and
    counts (n_classes,). Cached: callers must not modify them."""
    masks, counts = [torch.ones(1)], [1]
    for classes in per_dim:
        new_m, new_c = [], []
        for m, c in zip(masks, counts):
            for n, dm in classes:
                new_m.append(torch.outer(m, torch.tensor(dm, dtype=torch.float32)).reshape(-1))
                new_c.append(c * n)
        masks, counts = new_m, new_c
    return torch.stack(masks, 1), torch.tensor(counts, dtype=torch.float64)


def _taps(counts: list[list[int]]) -> torch.Tensor:
    """prod_d count_d[t_d] over the flattened kernel (float32)."""
    taps = torch.ones(())
    for cnt in counts:
        taps = torch.outer(taps.reshape(-1), torch.tensor(cnt, dtype=torch.float32))
    return taps.reshape(-1)


def _tap_weighted(block: torch.Tensor, taps: torch.Tensor, power: int) -> torch.Tensor:
    """sum over taps t of W[:, :, t]^power * taps[t] -> (C_out, C_in); with ``taps`` of
    shape (K, m), m such sums at once -> (C_out, C_in, m) (one pass over the weights)."""
    w = block.reshape(block.shape[0] * block.shape[1], -1)
    if taps.shape == (1,):
        return _one_tap(w, taps.to(w.dtype), power).reshape(block.shape[0], block.shape[1])
    if power == 2:
        w = w * w
    out = w @ taps.to(w.dtype)
    return out.reshape(block.shape[0], block.shape[1], *taps.shape[1:]).double()


def _one_tap(w: torch.Tensor, tap: torch.Tensor, power: int) -> torch.Tensor:
    """:func:`_tap_weighted` of a 1x1 kernel, ``w`` of shape (rows, 1): a product with one
    tap is elementwise (the rounding of the matrix-vector product's one term), so it
    runs block by block through one small buffer into the float64 result instead of
    through two temporaries of the weight's size (fresh pages of memory each time)."""
    flat = w.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float64)
    buffer = torch.empty(min(chunked.BLOCK, flat.numel()), dtype=w.dtype)
    for start in range(0, flat.numel(), chunked.BLOCK):
        source = flat[start : start + chunked.BLOCK]
        block = buffer[: source.numel()]
        if power == 2:
            torch.mul(source, source, out=block)
        else:
            block.copy_(source)
        out[start : start + chunked.BLOCK].copy_(block.mul_(tap))
    return out


#: Convolutions with fewer input channels per group than this get their coherent
#: part's power from the exact partial tap sums (cheap for them, and it matters: a
#: depthwise kernel's (sum_t W_t)^2 differs from sum_t W_t^2 channel by channel). With
#: more, the partial sums' squares average to the tap-wise squares over input channels.
EXACT_PARTIAL_SUMS = 16


def _partial_sum_power(block: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """(C_out, C_in) average over positions of (sum of the taps valid there)^2."""
    s = block.reshape(block.shape[0] * block.shape[1], -1) @ masks  # (rows, classes)
    return ((s.double() ** 2) @ counts / n).reshape(block.shape[0], block.shape[1])


def _tap_means(blocks: list[torch.Tensor], mean_in: torch.Tensor) -> torch.Tensor:
    """(C_out, K): the input channel means through each kernel tap, sum_c' W[c, c', t] mu_c'."""
    per_group, start = [], 0
    for blk in blocks:
        co, ci = blk.shape[0], blk.shape[1]
        per_group.append(torch.matmul(mean_in[start : start + ci].to(blk.dtype), blk.reshape(co, ci, -1)))
        start = start + ci if len(blocks) > 1 else start
    return torch.cat(per_group, 0).double()


def _mean_map_m2(tap_means: torch.Tensor, bias, masks: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """Per output channel, the average over positions of the squared deterministic part
    (the input means through the taps valid at each position, plus the bias): border
    positions see fewer taps, so the mean is not the same everywhere."""
    per_class = tap_means @ masks.double()  # (C_out, classes)
    if bias is not None:
        per_class = per_class + bias.detach().double().reshape(-1, 1)
    return (per_class**2) @ counts / n


def _conv_blocks(weight: torch.Tensor, groups: int, transposed: bool) -> list[torch.Tensor]:
    """The weight as per-group (C_out/g, C_in/g, *k) blocks, whatever the conv type."""
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    if not transposed:  # (C_out, C_in/g, *k)
        return list(w.chunk(groups, 0))
    # transposed: (C_in, C_out/g, *k)
    return [blk.transpose(0, 1) for blk in w.chunk(groups, 0)]


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)


@handles("conv", "conv1d", "conv2d", "conv3d", "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(ctx: Ctx) -> Effect:
    """Convolution and transposed convolution, per channel, with exact border effects.

    y[c, o] = sum over (c', tap t valid at o) of W[c, c', t] x[c', o + t]. With N_t the
    number of output positions at which tap t reads a real input (not zero padding):

        Var[y_c] = sum_{c', t} W[c,c',t]^2 v_c' N_t / N_out       (averaged over o)
        E[(dL/dx_c')^2] = sum_{c, t} W[c,c',t]^2 g2_c N_t / N_in

    A transposed convolution is the adjoint of a convolution, so the same sums serve
    with input and output positions exchanged. Groups make the channel matrices
    block-diagonal.

    A part of the input shared by all positions of a sample sees the kernel summed over
    the taps valid at each position: its power is the average over positions of (that
    partial sum)^2, and what stays shared by the positions is the square of the average
    partial sum S_cc' = sum_t W[c,c',t] N_t / N_out; a gradient part shared by all
    positions maps the same way (sums over input positions). For a depthwise kernel
    (sum_t W_t)^2 and sum_t W_t^2 differ channel by channel; with many input channels
    per group their sum over inputs averages to the tap-wise squares, and the shared
    part goes like the rest. The mean also varies over positions at the borders (fewer
    taps): its square is averaged over the position classes. Position axes of the
    output: its spatial axes.
    """
    node = ctx.node
    transposed = node.op.startswith("conv_transpose")
    ref = ctx.arg(0, "input")
    x_meta = ctx.meta(ref)
    y_meta = ctx.out_meta
    if node.kind == "call_module":
        m = node.fn
        weight, bias = ctx.param("weight"), ctx.param("bias")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
        zero_pad = getattr(m, "padding_mode", "zeros") == "zeros"
    else:
        weight, bias = ctx.layer_tensor("weight", 1), ctx.layer_tensor("bias", 2)
        if weight is None:
            raise Unhandled("convolution with a computed weight")
        stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
        dilation = ctx.arg(7 if transposed else 5, "dilation", 1)
        groups = ctx.arg(6, "groups", 1)
        zero_pad = True
    nd = weight.dim() - 2
    stride, dilation = as_tuple(stride, nd), as_tuple(dilation, nd)
    ksize = tuple(weight.shape[2:])
    x_sp, y_sp = x_meta.shape[-nd:], y_meta.shape[-nd:]
    if isinstance(padding, str):
        padding = (0,) * nd if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, ksize))
    padding = as_tuple(padding, nd)
    # o runs over the strided side, p = o*s + t*d - pad over the dense side
    o_sp, p_sp = (x_sp, y_sp) if transposed else (y_sp, x_sp)
    if zero_pad:  # the taps' counts of valid positions: channels.conv_counts below
        side = [
            _class_masks(tuple(tap_classes(o_sp[d], p_sp[d], ksize[d], stride[d], padding[d], dilation[d], dense) for d in range(nd)))
            for dense in (transposed, not transposed)  # (output side, input side)
        ]
    else:  # reflect / replicate / circular padding: every tap reads a real value
        counts = [[o_sp[d]] * ksize[d] for d in range(nd)]
        side = [_class_masks(tuple(((sp[d], (1,) * ksize[d]),) for d in range(nd))) for sp in (y_sp, x_sp)]
    blocks = _conv_blocks(weight, groups, transposed)
    n_x, n_y = math.prod(x_sp), math.prod(y_sp)
    axis_in, axis_out = len(x_meta.shape) - nd - 1, len(y_meta.shape) - nd - 1
    pos = tuple(range(axis_out + 1, len(y_meta.shape)))
    x = ctx.stat(ref)
    # positions differ in variance (borders of a deep zero-padded stack): each tap's count
    # of valid positions is weighted by the input's profile, and the output gets its own
    prof_in = x.prof if x.pos == tuple(range(axis_in + 1, len(x_meta.shape))) else None
    prof_out, geometry, fwd_total = None, None, 1.0
    if zero_pad:
        geo = [(o_sp[d], p_sp[d], ksize[d], stride[d], padding[d], dilation[d]) for d in range(nd)]
        weighted = [channels.conv_counts(prof_in[d] if prof_in is not None else None, geo[d] + (transposed,)) for d in range(nd)]
        counts = [c for c, _ in weighted]
        prof_out = tuple(p for _, p in weighted)
        fwd_total = math.prod(sum(c) for c in counts)
        geometry = tuple(g + (not transposed,) for g in geo)
    c_in = sum(b.shape[1] for b in blocks) if len(blocks) > 1 else blocks[0].shape[1]
    mean_in, var_in = x.channels(axis_in, c_in)
    (mask_y, cnt_y), (mask_x, cnt_x) = side
    taps = _taps(counts)
    dense = blocks[0].shape[1] >= EXACT_PARTIAL_SUMS
    w2 = _block_diag([_tap_weighted(b, taps, 2) for b in blocks])
    tap_means = _tap_means(blocks, mean_in)
    mean = tap_means @ taps.double() / n_y
    if bias is not None:
        mean = mean + bias.detach().double().reshape(-1)
    if mask_y.shape[1] > 1:  # borders: the mean differs between positions
        m2_mean = _mean_map_m2(tap_means, bias, mask_y, cnt_y, n_y).maximum(mean * mean)
    else:
        m2_mean = mean * mean
    one_group = len(blocks) == 1
    centred = cache(lambda: _tap_weighted(rows.centred(blocks[0]), taps, 2)) if one_group else None
    fluct = channels.Mat(w2, axis=axis_in, scale=1.0 / n_x, centred=centred)

    def with_spread(out: Stats) -> Stats:
        if one_group:
            out.row_spread = rows.dense(blocks[0], bias, var_in, out.ch_mean, taps, n_y)
        return out
    wrap = (lambda g: channels.Profiled(g, geometry, fwd_total)) if geometry is not None else (lambda g: g)  # noqa: E731
    if dense:
        # many inputs per output: over input channels (sum_t W_t)^2 averages to sum_t
        # W_t^2 (the shared part's power goes like the rest), and the square of the average
        # partial sum to sum_t W_t^2 (N_t / N)^2 -- with the taps' energies alike (random
        # weights), w2 times sum_t N_t^2 / (N sum_t N_t): on small maps, where positions
        # see different taps, only that much stays shared by them
        shared = float((taps * taps).sum() / taps.sum())
        cov = (w2 @ x.coherent(axis_in, c_in)) * (shared / n_y**2) if x.pos is not None else None
        xcov = (w2 @ x.cross(axis_in, c_in)) * (shared / n_y**2) if x.xcov != 0.0 else None
        out = with_spread(Stats.per_channel(axis_out, mean, (w2 @ var_in) / n_y + m2_mean, cov, pos, xcov))
        out.prof = prof_out
        gain = channels.Split(fluct, channels.Mat(w2, axis=axis_in, scale=shared / n_x**2), fluct)
        return Effect([out], [(ref.name, 0, 0, wrap(gain))])
    wsum = _block_diag([_tap_weighted(b, taps, 1) for b in blocks])
    wsum2 = wsum * wsum
    power_y = _block_diag([_partial_sum_power(b, mask_y, cnt_y, 1) for b in blocks])
    power_x = _block_diag([_partial_sum_power(b, mask_x, cnt_x, 1) for b in blocks])
    cov = None
    if x.pos is not None:
        cov_in = x.coherent(axis_in, c_in)
        cov = (wsum2 @ cov_in) / n_y**2
        var = (w2 @ (var_in - cov_in) + power_y @ cov_in) / n_y
    else:
        var = (w2 @ var_in) / n_y
    xcov = (wsum2 @ x.cross(axis_in, c_in)) / n_y**2 if x.xcov != 0.0 else None
    out = with_spread(Stats.per_channel(axis_out, mean, var + m2_mean, cov, pos, xcov))
    out.prof = prof_out
    gain = channels.Split(fluct, channels.Mat(wsum2, axis=axis_in, scale=1.0 / n_x**2), channels.Mat(power_x, axis=axis_in, scale=1.0 / n_x))
    return Effect([out], [(ref.name, 0, 0, wrap(gain))])


@handles("embedding")
def embedding(ctx: Ctx) -> Effect:
    """Lookup of rows of W: each output feature c has the statistics of column W[:, c]
    (ids uniform over the table)."""
    weight = ctx.layer_tensor("weight", 1)
    if weight is None:
        raise Unhandled("embedding with a computed table")
    mean, m2 = chunked.column_moments(weight)
    nd = len(ctx.out_meta.shape)
    pos = (1,) if nd >= 3 else None  # tokens of a (batch, tokens, features) lookup: independent ids
    return Effect([Stats.per_channel(nd - 1, mean, m2, torch.zeros_like(mean), pos)], [])
