"""Layout ops: values move, are copied or are subset, never changed (view, reshape, permute,
expand, indexing, split, cat, detach, pad)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradaudit.ir import Ref, Stats, TensorMeta
from gradaudit.propagation import channels
from gradaudit.propagation.ops.base import Ctx, Effect, Unhandled, handles, make_stats, numel_ratio, position_count


def copy_stats(s: Stats) -> Stats:
    """A copy of ``s`` (channel detail, coherence and row statistics included) for an
    output with the same values."""
    out = _moved(s, s.axis if s.has_channels else None, 1, s.pos)
    out.row_var, out.positive, out.prof = s.row_var, s.positive, s.prof
    return out


def _keep_third(out: Stats, s: Stats, r: int = 1, scale: float = 1.0) -> None:
    """The same values moved: the same third moments (channels repeated r times; times
    ``scale`` for a subset of positions whose variance is ``scale^(2/3)`` the average)."""
    if s.k3 == 0.0 and s.ch_k3 is None:
        return
    if out.has_channels and s.ch_k3 is not None:
        k3 = s.ch_k3.repeat_interleave(r) if r != 1 else s.ch_k3
        if k3.numel() == out.ch_mean.numel():
            out.set_third(k3 * scale)
            return
    out.k3 = s.k3 * scale


def _moved(s: Stats, axis: int | None, r: int = 1, pos: tuple[int, ...] | None = None, cov_to: float = 0.0) -> Stats:
    """``s`` with its channels now on ``axis`` (each repeated r times) or scalar, its
    positions on ``pos``; ``cov_to`` in [0, 1] moves the coherent covariance that far
    toward the variance (copies along position axes)."""
    if axis is None or not s.has_channels:
        base = s.scalar() if s.has_channels else s
        cov = base.cov + cov_to * (base.var - base.cov) if pos is not None else 0.0
        out = make_stats(s.mean, s.m2, pos, cov, base.xcov)
        out.k3 = s.k3
        return out
    mean, m2 = s.ch_mean, s.ch_m2
    cov = s.coherent(s.axis, mean.numel()) if pos is not None else None
    xcov = s.cross(s.axis, mean.numel()) if s.ch_xcov is not None else None
    if cov is not None and cov_to:
        cov = cov + cov_to * ((m2 - mean * mean).clamp_min(0.0) - cov)
    if r != 1:
        mean, m2 = mean.repeat_interleave(r), m2.repeat_interleave(r)
        cov = cov.repeat_interleave(r) if cov is not None else None
        xcov = xcov.repeat_interleave(r) if xcov is not None else None
    out = Stats.per_channel(axis, mean, m2, cov, pos, xcov)
    _keep_third(out, s, r)
    return out


_SAME_LAYOUT = frozenset({"identity", "contiguous", "clone", "to", "alias", "cpu", "cuda", "flip", "roll", "narrow"})


def _axis_map(ctx: Ctx, in_meta: TensorMeta) -> Callable[[int], int | None] | None:
    """Where each input axis goes (None: merged or dropped), for layout ops that move
    whole axes; None when the op reshapes (see :func:`channels.reshaped_positions`)."""
    op, nd, out_nd = ctx.node.op, len(in_meta.shape), len(ctx.out_meta.shape)
    if op in _SAME_LAYOUT or op == "repeat_interleave":
        return lambda a: a
    if op == "permute":
        dims = ctx.node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if "dims" in ctx.node.kwargs:
            dims = ctx.node.kwargs["dims"]
        return lambda a: channels.permuted_axis(a, dims, nd)
    if op in ("transpose", "t", "movedim"):
        if op == "movedim":
            src = channels.normalize_axis(ctx.arg(1, "source", 0), nd)
            dst = channels.normalize_axis(ctx.arg(2, "destination", 0), nd)
            order = [k for k in range(nd) if k != src]
            order.insert(dst, src)
            return lambda a: order.index(a)
        d0, d1 = (ctx.arg(1, "dim0", 0), ctx.arg(2, "dim1", 1)) if op == "transpose" else (0, 1)
        d0, d1 = channels.normalize_axis(d0, nd), channels.normalize_axis(d1, nd)
        return lambda a: {d0: d1, d1: d0}.get(a, a)
    if op == "select":
        d = channels.normalize_axis(ctx.arg(1, "dim", 0), nd)
        return lambda a: None if a == d else (a - 1 if a > d else a)
    if op in ("expand", "repeat", "tile"):
        return lambda a: a + out_nd - nd
    return None


def _layout_axis(ctx: Ctx, s: Stats, in_meta: TensorMeta) -> tuple[int | None, int]:
    """Where the channel axis goes through a permutation or reshape (None: mixed)."""
    if not s.has_channels:
        return None, 1
    out_shape = ctx.out_meta.shape
    moves = _axis_map(ctx, in_meta)
    if moves is not None:
        axis = moves(s.axis)
        if axis is None or out_shape[axis] != in_meta.shape[s.axis]:
            return None, 1
        return axis, 1
    found = channels.reshaped_axis(in_meta.shape, s.axis, out_shape) if ctx.node.op in _RESHAPES else None
    return found if found is not None else (None, 1)


_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})


def _layout_positions(ctx: Ctx, s: Stats, in_meta: TensorMeta) -> tuple[int, ...] | None:
    """Where the position axes go; size-1 axes and positions mixed into other axes drop."""
    if s.pos is None:
        return None
    out_shape = ctx.out_meta.shape
    moves = _axis_map(ctx, in_meta)
    if moves is not None:
        pos = [moves(a) for a in s.pos]
        pos = [a for a in pos if a is not None and out_shape[a] > 1]
        return tuple(sorted(pos)) or None
    if ctx.node.op in _RESHAPES:
        return channels.reshaped_positions(s.pos, in_meta.shape, out_shape)
    return None


def _copies_on_positions(ctx: Ctx, in_meta: TensorMeta, pos: tuple[int, ...] | None) -> bool:
    """Whether an op that copies values (expand, repeat) copies them along position axes only."""
    if pos is None:
        return False
    out_shape, nd = ctx.out_meta.shape, len(ctx.out_meta.shape)
    in_shape = (1,) * (nd - len(in_meta.shape)) + tuple(in_meta.shape)
    grown = [a for a in range(nd) if out_shape[a] != in_shape[a]]
    return bool(grown) and all(a in pos for a in grown)


@handles(
    "identity", "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t",
    "contiguous", "squeeze", "unsqueeze", "expand", "repeat", "to", "clone", "flip",
    "roll", "narrow", "select", "movedim", "tile", "repeat_interleave",
    "alias", "cpu", "cuda",
)
def layout(ctx: Ctx) -> Effect:
    """Reshuffle, copy or subset elements: values keep their statistics.

    The gradient of an input element is the sum of the gradients of its copies, so the
    per-element gain is numel(out) / numel(in) (1 for a permutation, r for r copies,
    k/n for a subset of k out of n). Channels are followed through permutations and
    reshapes that keep them intact (``flatten`` after a conv repeats each channel's
    statistics over its spatial block), and so are position axes (merged positions stay
    positions; positions merged into channels are lost).

    Copies along position axes (``expand`` of a per-sample vector over an image) are
    coherent: two positions share a source with probability q = (r - 1) / (P - 1), so
    cov_out = cov + q (var - cov); their gradients add coherently: an input receives
    r (g - s) + r^2 s (:class:`channels.Split`, f = r, c = r^2).
    """
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    in_meta = ctx.meta(ref)
    if ctx.node.op in ("select", "narrow") and s.pos is not None:
        plan = _one_axis_plan(ctx, in_meta)
        if plan is not None:
            return _indexed(ctx, ref, s, plan)
    ratio = numel_ratio(ctx.out_meta, in_meta)
    axis, r = _layout_axis(ctx, s, in_meta)
    pos = _layout_positions(ctx, s, in_meta)
    copies = ratio > 1 and _copies_on_positions(ctx, in_meta, pos)
    q = 0.0
    if copies:
        p_out = position_count(ctx.out_meta, pos)
        q = (ratio - 1) / (p_out - 1) if p_out > 1 else 0.0
    out = _moved(s, axis, r, pos, cov_to=q)
    if pos is not None and pos == s.pos and all(ctx.out_meta.shape[a] == in_meta.shape[a] for a in pos):
        out.prof = s.prof
    if axis is None:
        gain: Any = ratio
    elif r == 1:
        gain = channels.Diag(ratio)
    else:
        gain = channels.Regroup(r)
    if copies:
        per = (lambda k: channels.Diag(k)) if axis is not None and r == 1 else (lambda k: k)
        gain = channels.Split(per(ratio), per(ratio * ratio))
    else:
        order = _reordered_positions(ctx, s, in_meta, pos)
        if order is not None:  # a permutation of the position axes: the profiles follow them
            if s.prof is not None and len(s.prof) == len(order):
                out.prof = tuple(s.prof[order.index(k)] for k in range(len(order)))
            gain = channels.PositionMap(gain, tuple(in_meta.shape[a] for a in s.pos), tuple((k, None) for k in order))
    return Effect([out], [(ref.name, 0, 0, gain)])


def _reordered_positions(ctx: Ctx, s: Stats, in_meta: TensorMeta, pos: tuple[int, ...] | None) -> list[int] | None:
    """For an op that moves whole axes and changes where the position axes are
    (``transpose(1, 2)`` of tokens): for each input position axis, its index among the
    output's. None when the position axes stay put, or some are merged or dropped."""
    if pos is None or s.pos is None or pos == s.pos or len(pos) != len(s.pos):
        return None
    moves = _axis_map(ctx, in_meta)
    if moves is None:
        return None
    order = []
    for a in s.pos:
        b = moves(a)
        if b is None or b not in pos or ctx.out_meta.shape[b] != in_meta.shape[a]:
            return None
        order.append(pos.index(b))
    return order


def _one_axis_plan(ctx: Ctx, in_meta: TensorMeta) -> list | None:
    """:func:`_index_plan` of ``x.select(dim, i)`` / ``x.narrow(dim, start, length)``."""
    nd = len(in_meta.shape)
    dim = ctx.arg(1, "dim", 0)
    if not isinstance(dim, int):
        return None
    dim = channels.normalize_axis(dim, nd)
    if ctx.node.op == "select":
        piece: Any = ctx.arg(2, "index", 0)
    else:
        start, length = ctx.arg(2, "start", 0), ctx.arg(3, "length", 0)
        if not (isinstance(start, int) and isinstance(length, int)):
            return None
        start = start + in_meta.shape[dim] if start < 0 else start
        piece = slice(start, start + length)
    if not isinstance(piece, (int, slice)):
        return None
    return _index_plan((slice(None),) * dim + (piece,), in_meta.shape)


@handles("getitem")
def getitem(ctx: Ctx) -> Effect:
    """Tuple indexing passes one output through; tensor indexing takes a subset."""
    src, index = ctx.node.args[0], ctx.node.args[1]
    if not isinstance(src, Ref):
        raise Unhandled("getitem of a non-node")
    src_node = ctx.engine.graph[src.name]
    if src_node.tuple_output and isinstance(index, int):
        sub = src_node.structure[index]
        leaves = list(_leaves(sub))
        out, gains = [], []
        for k, leaf in enumerate(leaves):
            s = ctx.engine.leaf_stats(src.name, leaf)
            out.append(None if s is None else copy_stats(s))
            gains.append((src.name, leaf, k, channels.Diag(1.0)))
        return Effect(out, gains)
    if isinstance(index, Ref) or (isinstance(index, tuple) and any(isinstance(i, Ref) for i in index)):
        raise Unhandled("indexing with a tensor")
    s = ctx.stat(src)
    plan = _index_plan(index, ctx.meta(src).shape)
    if plan is not None and s.pos is not None:
        return _indexed(ctx, src, s, plan)
    # slicing keeps the layout (same number of axes): positions stay positions
    pos = s.pos if len(ctx.out_meta.shape) == len(ctx.meta(src).shape) else None
    base = s.scalar() if s.has_channels else s
    return Effect([make_stats(s.mean, s.m2, pos, base.cov)], [(src.name, 0, 0, numel_ratio(ctx.out_meta, ctx.meta(src)))])


def _index_plan(index: Any, shape) -> list[torch.Tensor | None | int] | None:
    """Per input axis, what a basic index keeps: None (the whole axis), a long tensor
    of positions (a slice), or an int (the axis is dropped). None when the index is not
    made of ints, slices and at most one Ellipsis."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in items):
        return None
    ellipses = [k for k, i in enumerate(items) if i is Ellipsis]
    if len(ellipses) > 1:
        return None
    if ellipses:
        k = ellipses[0]
        items = items[:k] + (slice(None),) * (len(shape) - len(items) + 1) + items[k + 1 :]
    if len(items) > len(shape):
        return None
    items = items + (slice(None),) * (len(shape) - len(items))
    plan: list[torch.Tensor | None | int] = []
    for it, n in zip(items, shape):
        if isinstance(it, int):
            if not -n <= it < n:
                return None
            plan.append(it + n if it < 0 else it)
            continue
        try:
            r = range(n)[it]
        except TypeError:  # a traced size in the slice
            return None
        plan.append(None if (r.start, r.step, len(r)) == (0, 1, n) else torch.tensor(list(r), dtype=torch.long))
    return plan


def _indexed(ctx: Ctx, src: Ref, s: Stats, plan: list) -> Effect:
    """A subset of positions (``x[:, 0]``, ``x[:, 1:]``, ``x.select(1, 0)``): the values
    keep their laws, but where positions differ (``Stats.prof``) the subset has its own
    variance, mean_{p in subset} prof_p times the average, and a profile of its own.
    Backward, the gradient lands on the chosen positions only: the input's gradient
    profile is the output's on them and 0 elsewhere (:class:`channels.PositionMap`);
    the level, numel(out) / numel(in) of the output's, is unchanged. A class token's
    head (``x[:, 0]``) thereby sends its whole gradient to token 0."""
    in_meta = ctx.meta(src)
    out_axis, k = [], 0
    for a in range(len(in_meta.shape)):
        out_axis.append(None if isinstance(plan[a], int) else k)
        k += 0 if isinstance(plan[a], int) else 1
    out_shape = ctx.out_meta.shape
    pos = tuple(out_axis[a] for a in s.pos if out_axis[a] is not None and out_shape[out_axis[a]] > 1) or None
    prof = s.prof if s.prof is not None and len(s.prof) == len(s.pos) else None
    factor, new_prof, maps = 1.0, [], []
    for j, a in enumerate(s.pos):
        sel = plan[a]
        index = torch.tensor([sel]) if isinstance(sel, int) else sel
        along = prof[j] if prof is not None else None
        if along is not None:
            v = along[index] if index is not None else along
            level = float(v.mean())
            factor *= level
            if out_axis[a] is not None and out_axis[a] in (pos or ()):
                new_prof.append(v / level if level > 0 else torch.ones_like(v))
        elif out_axis[a] is not None and out_axis[a] in (pos or ()):
            new_prof.append(torch.ones(out_shape[out_axis[a]], dtype=torch.float64))
        out_k = pos.index(out_axis[a]) if pos is not None and out_axis[a] in pos else None
        maps.append((out_k, index))
    ratio = numel_ratio(ctx.out_meta, in_meta)
    keep_channels = s.has_channels and plan[s.axis] is None and out_axis[s.axis] is not None
    if keep_channels:
        mean, var = s.channels(s.axis, s.ch_mean.numel())
        cov = s.coherent(s.axis, s.ch_mean.numel()) * factor if pos is not None else None
        xcov = s.cross(s.axis, s.ch_mean.numel()) if s.ch_xcov is not None else None
        out = Stats.per_channel(out_axis[s.axis], mean, mean * mean + var * factor, cov, pos, xcov)
        _keep_third(out, s, scale=factor**1.5)
        inner: Any = channels.Diag(ratio)
    else:
        base = s.scalar() if s.has_channels else s
        out = make_stats(base.mean, base.mean**2 + base.var * factor, pos, base.cov * factor, base.xcov)
        out.k3 = s.k3 * factor**1.5
        inner = ratio
    if pos is not None and new_prof and not all(bool(torch.allclose(v, torch.ones_like(v))) for v in new_prof):
        out.prof = tuple(new_prof)
    sizes = tuple(in_meta.shape[a] for a in s.pos)
    return Effect([out], [(src.name, 0, 0, channels.PositionMap(inner, sizes, tuple(maps)))])


def _leaves(structure: Any):
    if isinstance(structure, int):
        yield structure
    else:
        for s in structure:
            yield from _leaves(s)


@handles("split", "chunk", "unbind", "tensor_split", "split_with_sizes")
def split(ctx: Ctx) -> Effect:
    """Pieces of one tensor: each keeps the statistics, each passes its gradient back.

    Split along the channel axis: each piece carries its own channels."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    in_meta = ctx.meta(ref)
    dim = ctx.arg(2, "dim", 0) if ctx.node.op != "unbind" else ctx.arg(1, "dim", 0)
    dim = channels.normalize_axis(dim, len(in_meta.shape)) if isinstance(dim, int) else None
    out, gains = [], []
    start = 0
    for k, meta in enumerate(ctx.node.outputs):
        if meta is None:
            out.append(None)
            continue
        pos = s.pos if ctx.node.op != "unbind" else _unbound_positions(s.pos, dim)
        if s.has_channels and dim == s.axis and ctx.node.op != "unbind":
            stop = start + meta.shape[dim]
            cov = s.coherent(s.axis, s.ch_mean.numel())[start:stop] if pos is not None else None
            out.append(Stats.per_channel(s.axis, s.ch_mean[start:stop], s.ch_m2[start:stop], cov, pos))
            gains.append((ref.name, 0, k, channels.Place(start, stop, in_meta.shape[dim])))
            start = stop
        elif s.has_channels and dim != s.axis:
            axis = s.axis - 1 if ctx.node.op == "unbind" and dim is not None and dim < s.axis else s.axis
            out.append(_moved(s, axis, 1, pos))
            gains.append((ref.name, 0, k, channels.Diag(meta.numel / in_meta.numel)))
        else:
            out.append(_moved(s, None, 1, pos))
            gains.append((ref.name, 0, k, meta.numel / in_meta.numel))
    return Effect(out, gains)


def _unbound_positions(pos: tuple[int, ...] | None, dim: int | None) -> tuple[int, ...] | None:
    """The position axes of a piece of ``unbind(dim)`` (``q, k, v = qkv.unbind(0)``): the
    same axes, those after ``dim`` one lower; unbinding a position axis itself loses them."""
    if pos is None or dim is None or dim in pos:
        return None
    return tuple(a - 1 if a > dim else a for a in pos) or None


@handles("cat", "stack", "hstack", "vstack", "concat")
def cat(ctx: Ctx) -> Effect:
    """Concatenation: a numel-weighted mixture forward, gain 1 to every piece.

    Along the channel axis the channel vectors are concatenated; along another axis
    the per-channel statistics mix in proportion to each piece's size. Along a position
    axis the pieces' variances make the output's profile there (a class token of
    variance 1e-12 beside patch tokens of variance 0.3), and each piece's gradient is
    its part of the output gradient's profile (:class:`channels.PositionMap`)."""
    tensors = ctx.arg(0, "tensors")
    refs = [t for t in tensors if isinstance(t, Ref)]
    total = sum(ctx.meta(r).numel for r in refs)
    mean = sum(ctx.stat(r).mean * ctx.meta(r).numel for r in refs) / total
    m2 = sum(ctx.stat(r).m2 * ctx.meta(r).numel for r in refs) / total
    nd = len(ctx.out_meta.shape)
    dim = ctx.arg(1, "dim", 0)
    stats = [ctx.stat(r) for r in refs]
    is_cat = ctx.node.op in ("cat", "concat") and isinstance(dim, int) and len(refs) == len(tensors)
    dim = channels.normalize_axis(dim, nd) if is_cat else None
    pos = _cat_positions(stats) if is_cat else None
    axis = stats[0].axis if all(st.has_channels for st in stats) else None
    if is_cat and axis is not None and all(st.axis == axis for st in stats):
        if dim == axis:
            covs = torch.cat([st.coherent(axis, st.ch_mean.numel()) for st in stats]) if pos is not None else None
            out = Stats.per_channel(axis, torch.cat([st.ch_mean for st in stats]), torch.cat([st.ch_m2 for st in stats]), covs, pos)
            gains, start = [], 0
            for r, st in zip(refs, stats):
                stop = start + st.ch_mean.numel()
                gains.append((r.name, 0, 0, channels.Take(start, stop)))
                start = stop
            return Effect([out], gains)
        if len({st.ch_mean.numel() for st in stats}) == 1:
            w = [ctx.meta(r).numel / total for r in refs]
            cm = sum(wi * st.ch_mean for wi, st in zip(w, stats))
            c2 = sum(wi * st.ch_m2 for wi, st in zip(w, stats))
            cv = sum(wi * (st.coherent(axis, st.ch_mean.numel()) if st.pos is not None else 0.0) for wi, st in zip(w, stats)) if pos is not None else None
            out = Stats.per_channel(axis, cm, c2, cv, pos)
            return _along_positions(ctx, refs, stats, dim, out, lambda: channels.Diag(1.0))
    cov = sum(st.cov * ctx.meta(r).numel for r, st in zip(refs, stats)) / total if pos is not None else 0.0
    out = make_stats(mean, m2, pos, cov)
    if pos is None:
        return Effect([out], [(r.name, 0, 0, 1.0) for r in refs])
    return _along_positions(ctx, refs, stats, dim, out, lambda: 1.0)


def _cat_positions(stats: list[Stats]) -> tuple[int, ...] | None:
    """The position axes of a concatenation: those of its pieces, when they agree. A
    piece without tracked positions (a parameter such as the class and distillation
    tokens) joins them with no coherent part of its own."""
    known = {st.pos for st in stats if st.pos is not None}
    return known.pop() if len(known) == 1 else None


def _along_positions(ctx: Ctx, refs: list[Ref], stats: list[Stats], dim: int, out: Stats, unit) -> Effect:
    """The output's profile when the pieces are laid along position axis ``dim`` (each
    piece's variance times its own profile there; the other axes average the pieces'
    profiles, weighted by their share of the variance), and gains that hand each piece
    its slice of the gradient's profile."""
    pos = out.pos
    sizes = tuple(ctx.out_meta.shape[a] for a in pos)
    if dim not in pos:
        out.prof = channels.combine_profiles([(_piece_profile(ctx, r, st, pos), _piece_var(st) * ctx.meta(r).numel) for r, st in zip(refs, stats)])
        return Effect([out], [(r.name, 0, 0, unit()) for r in refs])
    k = pos.index(dim)
    along, weights, gains, start = [], [], [], 0
    for r, st in zip(refs, stats):
        n = ctx.meta(r).shape[dim]
        prof = _piece_profile(ctx, r, st, pos)
        var = _piece_var(st)
        along.append(var * (prof[k] if prof is not None else torch.ones(n, dtype=torch.float64)))
        weights.append((None if prof is None else tuple(v for j, v in enumerate(prof) if j != k), var * ctx.meta(r).numel))
        index = torch.arange(start, start + n)
        maps = tuple((j, index if a == dim else None) for j, a in enumerate(pos))
        piece_sizes = tuple(ctx.meta(r).shape[a] for a in pos)
        gains.append((r.name, 0, 0, channels.PositionMap(unit(), piece_sizes, maps, gather=True)))
        start += n
    prof_dim = torch.cat(along)
    level = float(prof_dim.mean())
    others = channels.combine_profiles(weights) if len(pos) > 1 else None
    axes = []
    for j, n in enumerate(sizes):
        if j == k:
            axes.append(prof_dim / level if level > 0 else torch.ones(n, dtype=torch.float64))
        else:
            axes.append(others[j - (j > k)] if others is not None else torch.ones(n, dtype=torch.float64))
    out.prof = None if all(bool(torch.allclose(v, torch.ones_like(v))) for v in axes) else tuple(axes)
    return Effect([out], gains)


def _piece_profile(ctx: Ctx, ref: Ref, st: Stats, pos: tuple[int, ...]) -> tuple | None:
    return st.prof if st.pos == pos and st.prof is not None and len(st.prof) == len(pos) else None


def _piece_var(st: Stats) -> float:
    return max(float(st.m2 - st.mean * st.mean), 0.0) if not st.has_channels else float((st.ch_m2 - st.ch_mean**2).clamp_min(0.0).mean())


@handles("detach")
def detach(ctx: Ctx) -> Effect:
    """Same values, no gradient."""
    ref = ctx.first_ref()
    return Effect([copy_stats(ctx.stat(ref))], [(ref.name, 0, 0, 0.0)])


@handles("pad")
def pad(ctx: Ctx) -> Effect:
    """Constant padding with value c: a mixture of the input and c; gain 1 to the input."""
    ref = ctx.first_ref()
    s = ctx.stat(ref)
    mode = ctx.arg(2, "mode", "constant")
    if mode != "constant":
        return layout(ctx)
    c = float(ctx.arg(3, "value", 0.0) or 0.0)
    frac = 1.0 / numel_ratio(ctx.out_meta, ctx.meta(ref))
    base = s.scalar() if s.has_channels else s
    out = make_stats(frac * s.mean + (1 - frac) * c, frac * s.m2 + (1 - frac) * c * c, s.pos, frac * frac * base.cov)
    return Effect([out], [(ref.name, 0, 0, 1.0)])
