"""Per-channel bookkeeping: where the channel axis goes, and channel-aware gains.

A handler's backward gain is a plain float (every element of the input gets ``gain *
E[(dL/dy)^2]``) or one of the channel-aware gains below, which map the per-channel
gradient second moments of an output (a vector over its channel axis) to those of an
input. :func:`apply_gain` applies any of them; when either side does not track
channels, the result collapses to the scalar average, which is exact for the mean.

A gradient is carried as :class:`Grad`: its second moment and its two coherent
covariances (same sample, other position; other sample -- see :class:`gradaudit.ir.Stats`).
A plain gain maps the three alike, which is exact for maps that act on every position
and sample the same way (a linear layer, a per-channel scale, a permutation). Ops whose
map differs for the coherent part (a convolution sums its taps before squaring them, an
average over positions keeps a coherent gradient whole) use :class:`Split`; ops that mix
the three (a normalization's projection, an elementwise derivative) use :class:`Tri`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

from gradaudit.ir import mean_value


@dataclass
class Grad:
    """E[g^2], E[g_i g_j] (same sample, other position) and E[g_i g_j] (other sample),
    each a float or a per-channel float64 vector.

    ``dm`` and ``da`` (scalars) are the power missing, relative to a gradient independent
    of the forward values, along two directions of each row (the values along the
    channel axis at one position): the row's mean direction 1/sqrt(n) and the value's
    own centred direction. A LayerNorm's backward removes both (dm = da = E[g^2]); the
    next LayerNorm upstream then has nothing left to remove there. Maps that mix
    channels make the gradient generic again (0)."""

    g: Any = 0.0
    s: Any = 0.0
    x: Any = 0.0
    dm: float = 0.0
    da: float = 0.0
    #: relative E[g^2] along each position axis (mean 1; None: the same everywhere)
    prof: tuple | None = None
    #: E[g_i y_i g_j y_j] beyond E[y_i y_j] E[g_i g_j] for two positions of one sample /
    #: two samples (y the value itself): a ReLU's mask makes g follow y. Set by the
    #: elementwise backward, read by the normalization that produced y.
    es: Any = 0.0
    ex: Any = 0.0

    def __add__(self, other: "Grad") -> "Grad":
        prof = None
        if self.prof is not None or other.prof is not None:  # the levels weigh the profiles
            prof = combine_profiles([(self.prof, _level(self.g)), (other.prof, _level(other.g))])
        return Grad(
            self.g + other.g, self.s + other.s, self.x + other.x, self.dm + other.dm, self.da + other.da, prof,
            self.es + other.es, self.ex + other.ex,
        )

    def mean(self) -> "Grad":
        """Scalar averages over channels."""
        g, s, x, es, ex = (mean_value(v) if isinstance(v, torch.Tensor) else float(v) for v in (self.g, self.s, self.x, self.es, self.ex))
        return Grad(g, s, x, self.dm, self.da, self.prof, es, ex)

    def vector(self, n: int) -> "Grad":
        """The three as vectors over ``n`` channels (scalars broadcast)."""
        return Grad(_as_vec(self.g, n), _as_vec(self.s, n), _as_vec(self.x, n), self.dm, self.da, self.prof, _as_vec(self.es, n), _as_vec(self.ex, n))


def _as_vec(v: Any, n: int) -> torch.Tensor:
    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n:
        return v
    return torch.full((n,), mean_value(v) if isinstance(v, torch.Tensor) else float(v), dtype=torch.float64)


def _level(v: Any) -> float:
    return mean_value(v) if isinstance(v, torch.Tensor) else float(v)


def combine_profiles(parts: list[tuple[tuple | None, float]]) -> tuple | None:
    """The profile of a sum of independent values: per axis, the average of the parts'
    profiles weighted by their second moments (a part without one is flat)."""
    if all(p is None for p, _ in parts):
        return None
    shapes = {tuple(v.numel() for v in p) for p, _ in parts if p is not None}
    if len(shapes) != 1:
        return None
    total = sum(w for _, w in parts)
    if total <= 0:
        return next(p for p, _ in parts if p is not None)
    out = []
    for k, _ in enumerate(shapes.pop()):
        acc = None  # the weighted sum, from its first term (what 0 + the term gives)
        for p, w in parts:
            term = w * (p[k] if p is not None else 1.0)
            acc = term if acc is None else acc + term
        out.append(acc / total)
    return tuple(out)


ZERO = Grad()


@dataclass(frozen=True)
class Split:
    """Separate gains for the gradient's fluctuating part g - s and its part s shared by
    the positions of a sample (and x, shared by the batch):

        g_in = f(g - s) + cg(s),   s_in = c(s),   x_in = c(x)     (cg defaults to c)

    A convolution maps g - s through sum_t W_t^2 and a coherent part through its partial
    tap sums: (average partial sum)^2 for what stays coherent (``c``), average of the
    squared partial sums for its power (``cg``; they differ at borders). An average over
    positions keeps coherent parts whole."""

    f: Any
    c: Any
    cg: Any = None


@dataclass(frozen=True)
class Tri:
    """A per-channel linear map of (g, s, x): ``m`` of shape (3, 3) or (C, 3, 3), times
    ``k`` (a float or a per-channel vector); then, if given, the channel map ``mat``
    (C_out, C_in) on each of the three, as :class:`Mat` does (a map the same at every
    position and sample commutes with the component mixing)."""

    m: Any
    k: Any = 1.0
    axis: int | None = None
    mat: Any = None
    #: the map keeps every row's sum (an average over positions): a gradient's missing
    #: row-mean power (``Grad.dm``) stays missing, in proportion
    rows_kept: bool = False
    #: a normalization's x_hat projection: (n, p, gamma^2, rho_s, rho_x); the gradient's
    #: correlation with its own value (``Grad.es``, ``Grad.ex``) adds to E[c^2]
    #: ((p - 1) es + (n - p) ex) / (n gamma^2), removed like the rest of c
    excess: tuple | None = None


@dataclass(frozen=True)
class RowNorm:
    """A LayerNorm / RMSNorm backward over rows of n values: dL/dx = (1/sigma) P (gamma *
    g), P removing the row mean (unless ``rms``) and the x_hat direction. The power it
    removes per element is (M + C) / n with M = E[<gamma g, 1>^2] / n and C = E[<gamma g,
    x_hat>^2] / n; for a gradient independent of x each is mean(gamma^2 g); what
    a previous normalization already removed (``Grad.dm``, ``Grad.da``) is not there to
    remove again. To first order in gamma's spread and beta:

        M = gbar^2 (g - dm) + var(gamma) g,   C = gbar^2 (g - da) + (var(gamma) + mean(beta^2)) g
        g_in = k (gamma^2 g - (M + C) / n)   (per channel; k = E[1 / (sigma^2 + eps)])

    and g_in is orthogonal to both directions: dm_in = da_in = mean(g_in) (RMSNorm: to
    x_hat only, dm_in = 0). Coherent parts (s, x) scale like g."""

    gamma: torch.Tensor
    k: float
    n: float
    rms: bool
    beta2: float = 0.0
    axis: int | None = None
    #: per position (flattened over the position axes), E[1 / (sigma_p^2 + eps)] / k when
    #: the rows' variance differs between positions (``Stats.prof``); None: the same
    pos_k: torch.Tensor | None = None
    pos_sizes: tuple = ()


@dataclass(frozen=True)
class Profiled:
    """A convolution's gain with position profiles: ``gain`` was built with the
    input's variance profile weighting each tap's count (``forward_counts``, per axis);
    the backward weights them with the output gradient's profile instead, and gives the
    input gradient its own profile (:func:`conv_profile`). ``geometry`` per axis:
    (n_strided, n_dense, k, stride, pad, dil, dense_side of the gradient's input)."""

    gain: Any
    geometry: tuple
    forward_total: float


@dataclass(frozen=True)
class PositionMap:
    """``gain`` for an op that moves values along position axes (``cat`` of a class token
    and patch tokens, ``x[:, 0]``): the input gradient's profile, and the share of the
    level it gets, follow from the output gradient's profile (Grad.prof) on the positions
    the input reaches.

    ``maps`` has one entry per position axis of the input, in order: ``(out_k, index)``
    with ``out_k`` the axis's place in the output's profile (None: the output dropped
    it) and ``index`` the positions (a long tensor; None: the same positions). With
    ``gather`` the input's position i is the output's position index[i] (a piece of a
    ``cat``): g_in[i] = g_out[index[i]], so the level scales by mean_i prof_out[index[i]]
    and the profile is prof_out[index] over that mean. Otherwise (indexing) the output's
    position o reads the input's index[o]: the input's profile collects sum_{o ->
    i} prof_out[o] (``gain`` carries the level, numel(out) / numel(in)), 0 elsewhere."""

    gain: Any
    sizes: tuple
    maps: tuple
    gather: bool = False


@dataclass(frozen=True)
class Flat:
    """``gain``, after which the gradient is the same at every position whatever its
    profile was: attention's keys and values collect the gradient of every query."""

    gain: Any


@dataclass(frozen=True)
class Aligned:
    """``gain`` applied to an operand of a sum that meets a row normalization: its rows'
    mean direction is the output's, its centred direction shares ``share`` (the squared
    cosine, its variance's share of the sum's) of the output's, so the gradient keeps dm
    and share * da of what was removed there."""

    gain: Any
    share: float
    scale: float = 1.0


@dataclass(frozen=True)
class Diag:
    """Channel layout preserved: g2_in[c] = k[c] * g2_out[c] (k a float or a vector)."""

    k: Any
    axis: int | None = None


@dataclass(frozen=True)
class Mat:
    """Channels mixed: g2_in[c'] = scale sum_c M[c, c'] g2_out[c], M of shape (C_out, C_in).

    ``centred`` (a zero-argument callable, or None) gives the same matrix built from the
    weight minus the mean of its rows: the map of a gradient whose rows sum to zero
    (``Grad.dm``; :mod:`gradaudit.propagation.rows`)."""

    m: torch.Tensor
    axis: int | None = None
    scale: float = 1.0
    centred: Any = None


@dataclass(frozen=True)
class RowSumZero:
    """``gain``, whose result sums to zero along each row of the channel axis (a softmax's
    backward over its channels): the row's mean direction carries no power (``Grad.dm``
    = E[g^2])."""

    gain: Any


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


def _vec(out_g2: "float | _Level", out_vec: torch.Tensor | None, n: int) -> torch.Tensor:
    if out_vec is not None and out_vec.numel() == n:
        return out_vec
    return torch.full((n,), float(out_g2), dtype=torch.float64)


class _Level:
    """The average of a float or vector, taken only when ``float()`` asks for it (most
    gains use the vector itself)."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __float__(self) -> float:
        return _level(self.v)


def _basic(gain: Any, out: float | torch.Tensor) -> float | torch.Tensor:
    """One plain gain applied to one per-channel quantity (float or vector)."""
    vec = out if isinstance(out, torch.Tensor) else None
    val = _Level(out)
    if isinstance(gain, (int, float)):
        return float(gain) * out
    if isinstance(gain, (Diag, AtMax)):
        k = gain.k
        if isinstance(k, torch.Tensor):
            return k * _vec(val, vec, k.numel())
        return float(k) * out
    if isinstance(gain, Mat):
        r = gain.m.t() @ _vec(val, vec, gain.m.shape[0]).to(gain.m.dtype)
        return (r * gain.scale if gain.scale != 1.0 else r).double()
    if isinstance(gain, Regroup):
        return out if vec is None else vec.reshape(-1, gain.r).mean(1)
    if isinstance(gain, Place):
        v = torch.zeros(gain.n_in, dtype=torch.float64)
        v[gain.start : gain.stop] = _vec(val, vec, gain.stop - gain.start)
        return v
    if isinstance(gain, Take):
        return out if vec is None else vec[gain.start : gain.stop]
    raise TypeError(f"unknown gain {gain!r}")  # pragma: no cover - handlers only emit the types above


def _three_through(m: Any, o: Grad) -> Any:
    """M^T [g s x] for a channel matrix M (C_out, C_in) and a gradient's three vectors
    over C_out: (C_in, 3). A float64 matrix multiplies the three as rows, [g s x]^T M
    (BLAS takes 5x longer for a transposed matrix times three columns): the same sums
    in another order, equal to rounding."""
    if isinstance(m, torch.Tensor) and m.dtype == torch.float64:
        return (torch.stack([o.g, o.s, o.x]).double() @ m).t()
    return m.t() @ torch.stack([o.g, o.s, o.x], 1).to(m.dtype)


def _axis_of(gain: Any) -> int | None:
    return getattr(gain, "axis", None)


def apply_gain(gain: Any, out: Grad, n_in: int | None, in_axis: int | None = None) -> Grad:
    """Contribution of one output's gradient to one input.

    ``n_in`` / ``in_axis`` describe the input's tracked channels (None when it tracks
    none). A gain's ``axis`` names the input axis its vector refers to (None: the
    input's own channel axis). The result holds vectors over the input's channels when
    both agree, else their scalar averages.
    """
    if isinstance(gain, Profiled):
        factor, prof = profiled_backward(gain, out.prof)
        res = apply_gain(gain.gain, out, n_in, in_axis)
        if factor != 1.0:
            res = Grad(_scaled(res.g, factor), _scaled(res.s, factor), _scaled(res.x, factor), res.dm, res.da)
        res.prof = prof
        return res
    if isinstance(gain, PositionMap):
        factor, prof = mapped_profile(gain, out.prof)
        res = apply_gain(gain.gain, out, n_in, in_axis)
        if factor != 1.0:
            res = Grad(_scaled(res.g, factor), _scaled(res.s, factor), _scaled(res.x, factor), res.dm * factor, res.da * factor)
        res.prof = prof
        return res
    if isinstance(gain, Flat):
        res = apply_gain(gain.gain, out, n_in, in_axis)
        res.prof = None
        return res
    if isinstance(gain, RowSumZero):
        res = apply_gain(gain.gain, out, n_in, in_axis)
        res.dm, res.da = _level(res.g), 0.0
        return res
    if out.dm > 0:
        gain = _for_centred_rows(gain, min(out.dm / max(_level(out.g), 1e-300), 1.0))
    dm = da = 0.0
    aligned = isinstance(gain, Aligned)
    if aligned:
        dm, da = gain.scale * out.dm, gain.scale * gain.share * out.da
        gain = gain.gain
    if isinstance(gain, Split):
        cg = gain.cg if gain.cg is not None else gain.c
        if _is_zero(out.s) and _is_zero(out.x):
            res = Grad(_basic(gain.f, out.g), 0.0, 0.0)
        elif cg is gain.f and isinstance(gain.f, Mat) and isinstance(gain.c, Mat) and gain.c.m is gain.f.m:
            # one pass over the shared matrix for the three
            n = gain.f.m.shape[0]
            o = out.vector(n)
            r = _three_through(gain.f.m, o)
            res = Grad(r[:, 0] * gain.f.scale, r[:, 1] * gain.c.scale, r[:, 2] * gain.c.scale)
        elif cg is gain.f:  # the coherent part's power goes the fluctuating part's way
            res = Grad(_basic(gain.f, out.g), _basic(gain.c, out.s), _basic(gain.c, out.x))
        else:
            res = Grad(_basic(gain.f, out.g - out.s) + _basic(cg, out.s), _basic(gain.c, out.s), _basic(gain.c, out.x))
        axis = _axis_of(gain.f)
    elif isinstance(gain, Tri):
        res, axis = _tri(gain, out), gain.axis
        if gain.mat is not None:
            mat = Mat(gain.mat)
            res = Grad(_basic(mat, res.g), _basic(mat, res.s), _basic(mat, res.x))
        if gain.rows_kept and out.dm > 0:
            dm = out.dm / max(_level(out.g), 1e-300) * _level(res.g)
    elif isinstance(gain, RowNorm):
        res, axis = _row_norm(gain, out), gain.axis
        prof = out.prof
        if gain.pos_k is not None:
            factor, prof = weighted_positions(gain.pos_k, gain.pos_sizes, out.prof)
            res = Grad(_scaled(res.g, factor), _scaled(res.s, factor), _scaled(res.x, factor))
        da = float(torch.as_tensor(res.g).mean())
        dm = 0.0 if gain.rms else da  # RMSNorm keeps the row mean
        res.dm, res.da, res.prof = dm, da, prof
        return _on_channels(res, n_in, axis, in_axis)
    else:
        plain = _is_zero(out.s) and _is_zero(out.x)
        if not plain and isinstance(gain, Mat):  # one pass over the matrix for the three
            o = out.vector(gain.m.shape[0])
            r = _three_through(gain.m, o)
            r = (r * gain.scale if gain.scale != 1.0 else r).double()
            res = Grad(r[:, 0], r[:, 1], r[:, 2])
        else:
            res = Grad(_basic(gain, out.g), 0.0 if plain else _basic(gain, out.s), 0.0 if plain else _basic(gain, out.x))
        axis = _axis_of(gain)
        if aligned:
            pass
        elif isinstance(gain, (int, float)) or (isinstance(gain, Diag) and not isinstance(gain.k, torch.Tensor)):
            k = float(gain if isinstance(gain, (int, float)) else gain.k)
            dm, da = k * out.dm, k * out.da
        elif isinstance(gain, Diag):  # a per-channel scale keeps the directions' power as far as sqrt(k) is flat
            k = float(gain.k.clamp_min(0.0).sqrt().mean()) ** 2
            dm, da = k * out.dm, k * out.da
    res.dm, res.da = dm, da
    res.prof = out.prof if not isinstance(gain, (Regroup, Split)) else None
    return _on_channels(res, n_in, axis, in_axis)


def _on_channels(res: Grad, n_in: int | None, axis: int | None, in_axis: int | None) -> Grad:
    """``res`` as vectors over the input's channels when they match, else scalar averages."""
    vectors = [v for v in (res.g, res.s, res.x) if isinstance(v, torch.Tensor)]
    if n_in is not None and vectors and all(v.numel() == n_in for v in vectors) and (axis is None or axis == in_axis):
        return res.vector(n_in)
    return res.mean()


def sets_profile(gain: Any) -> bool:
    """Whether ``gain`` gives the input gradient its own position profile (the input's
    positions differ from the output's)."""
    return isinstance(gain, (Profiled, PositionMap))


def outer_profile(prof: tuple | None, sizes: Sequence[int]) -> torch.Tensor:
    """The per-position relative value (flattened over the position axes) of a separable
    profile: the product of its axes' vectors (ones when flat)."""
    total = torch.ones((), dtype=torch.float64)
    usable = prof is not None and len(prof) == len(sizes) and all(v.numel() == n for v, n in zip(prof, sizes))
    for k, n in enumerate(sizes):
        axis = prof[k] if usable else torch.ones(n, dtype=torch.float64)
        total = torch.outer(total.reshape(-1), axis.double()).reshape(-1)
    return total


def marginal_profile(weights: torch.Tensor, sizes: Sequence[int]) -> tuple | None:
    """Per-axis profiles (mean 1) of per-position weights: each axis's vector is the
    average over the other axes (the separable description keeps the marginals)."""
    w = weights.reshape(*sizes) if sizes else weights
    out = []
    for k in range(len(sizes)):
        other = [d for d in range(len(sizes)) if d != k]
        v = w.mean(dim=other) if other else w
        level = mean_value(v)
        out.append(v / level if level > 0 else torch.ones_like(v))
    return tuple(out) or None


def weighted_positions(pos_k: torch.Tensor, sizes: Sequence[int], prof: tuple | None) -> tuple[float, tuple | None]:
    """(factor on the level, the new profile) of a gradient with profile ``prof`` scaled
    position by position by ``pos_k`` (mean over positions of prof_p k_p; the profile
    of prof_p k_p)."""
    w = outer_profile(prof, sizes) * pos_k
    factor = mean_value(w)
    if factor <= 0:
        return 0.0, None
    return factor, marginal_profile(w / factor, sizes)


def mapped_profile(gain: PositionMap, prof: tuple | None) -> tuple[float, tuple | None]:
    """(factor on the level, the input gradient's profile) through a :class:`PositionMap`."""
    kept = [m[0] for m in gain.maps if m[0] is not None]
    n_out = max(kept) + 1 if kept else 0
    have = prof is not None and len(prof) == n_out
    factor, new = 1.0, []
    for size, (out_k, index) in zip(gain.sizes, gain.maps):
        along = prof[out_k].double() if have and out_k is not None else None
        if index is None:
            new.append(along if along is not None and along.numel() == size else torch.ones(size, dtype=torch.float64))
            continue
        if along is None or along.numel() != (index.numel() if not gain.gather else along.numel()):
            along = torch.ones(index.numel() if not gain.gather else int(index.max()) + 1, dtype=torch.float64)
        if gain.gather:
            v = along[index]
            level = mean_value(v)
            factor *= level
            new.append(v / level if level > 0 else torch.ones_like(v))
        else:
            v = torch.zeros(size, dtype=torch.float64).index_add_(0, index, along)
            level = mean_value(v)
            new.append(v / level if level > 0 else torch.ones_like(v))
    if all(bool(torch.all(v == 1.0)) for v in new):
        return factor, None
    return factor, tuple(new)


def _for_centred_rows(gain: Any, f: float) -> Any:
    """``gain`` for a gradient missing the fraction ``f`` of its power along each row's
    mean direction: a :class:`Mat` that knows its centred matrix maps it through
    (1 - f) M + f M_centred (:mod:`gradaudit.propagation.rows`); other gains unchanged."""
    if isinstance(gain, Mat) and gain.centred is not None:
        return Mat((1.0 - f) * gain.m.double() + f * gain.centred(), gain.axis, gain.scale)
    if isinstance(gain, Split) and isinstance(gain.f, Mat) and gain.f.centred is not None:
        f_map = _for_centred_rows(gain.f, f)
        return Split(f_map, gain.c, f_map if gain.cg is gain.f else gain.cg)
    return gain


def _scaled(v: Any, k: float) -> Any:
    return v * k


def conv_counts(prof: torch.Tensor | None, geo: tuple) -> tuple[list[float], torch.Tensor]:
    """Along one axis of a convolution (``geo`` = (n_strided, n_dense, k, stride, pad,
    dil, dense_side)): for each tap t, the profile-weighted number of positions where it
    reads a real value, and the profile this gives the other side.

    Going to the strided side (a conv's output, or a transposed conv's input), position
    o sums taps t reading p = o s + t d - pad: weight prof[p]; going to the dense side
    (a conv's input), position p collects the o that read it. Flat profiles give the
    plain counts. The new profile is the tap-summed weight per position, normalised to
    mean 1 (border positions collect fewer taps)."""
    per_tap, per_dest = _incidence(*geo)
    if prof is None or prof.numel() != per_tap.shape[1]:
        counts, dest = per_tap.sum(1), per_dest.sum(1)
    else:
        counts, dest = per_tap @ prof, per_dest @ prof
    mean = mean_value(dest)
    return counts.tolist(), (dest / mean if mean > 0 else torch.ones_like(dest))


@lru_cache(maxsize=512)
def _incidence(n_s: int, n_d: int, k: int, stride: int, pad: int, dil: int, dense_side: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrices (k, n_src) and (n_dest, n_src): which source positions each tap and
    each destination position collects (see :func:`conv_counts`). Cached: read only."""
    n_src, n_dest = (n_s, n_d) if dense_side else (n_d, n_s)
    per_tap = torch.zeros(k, n_src, dtype=torch.float64)
    per_dest = torch.zeros(n_dest, n_src, dtype=torch.float64)
    for o in range(n_s):
        for t in range(k):
            q = o * stride + t * dil - pad
            if 0 <= q < n_d:
                src, dst = (o, q) if dense_side else (q, o)
                per_tap[t, src] += 1.0
                per_dest[dst, src] += 1.0
    return per_tap, per_dest


def profiled_backward(gain: Profiled, prof: tuple | None) -> tuple[float, tuple | None]:
    """(factor on the gain, the input gradient's profile) for an output gradient profile."""
    total, new = 1.0, []
    for k, geo in enumerate(gain.geometry):
        counts, dest = conv_counts(prof[k] if prof is not None and k < len(prof) else None, geo)
        total *= sum(counts)
        new.append(dest)
    factor = total / gain.forward_total if gain.forward_total > 0 else 1.0
    return factor, tuple(new)


def _is_zero(v: Any) -> bool:
    return (not isinstance(v, torch.Tensor) and v == 0.0) or (isinstance(v, torch.Tensor) and v.dim() == 0 and float(v) == 0.0)


def _row_norm(gain: RowNorm, out: Grad) -> Grad:
    n = gain.gamma.numel()
    o = out.vector(n)
    gamma2 = gain.gamma * gain.gamma
    gbar2 = mean_value(gain.gamma) ** 2
    var_g = float(gain.gamma.var(unbiased=False)) if n > 1 else 0.0
    g_mean = mean_value(gamma2 * o.g)
    ref = mean_value(o.g)
    m = 0.0 if gain.rms else gbar2 * max(ref - out.dm, 0.0) + var_g * ref
    c = gbar2 * max(ref - out.da, 0.0) + (var_g + gain.beta2) * ref
    removed = (m + c) / gain.n
    keep = max(1.0 - removed / g_mean, 0.0) if g_mean > 0 else 0.0
    k = gain.k
    return Grad(k * (gamma2 * o.g - removed).clamp_min(0.0), k * gamma2 * o.s * keep, k * gamma2 * o.x * keep)


def _tri(gain: Tri, out: Grad) -> Grad:
    m = gain.m
    n = m.shape[0] if m.dim() == 3 else (gain.mat.shape[0] if gain.mat is not None else None)
    if n is None:
        n = next((v.numel() for v in (out.g, out.s, out.x) if isinstance(v, torch.Tensor)), None)
    if n is None and isinstance(gain.k, torch.Tensor):
        n = gain.k.numel()
    if n is None:
        v = torch.tensor([float(out.g), float(out.s), float(out.x)], dtype=torch.float64)
        r = (m @ v) * float(gain.k)
        return Grad(float(r[0]), float(r[1]), float(r[2]))
    o = out.vector(n)
    v = torch.stack([o.g, o.s, o.x], dim=-1)  # (C, 3)
    r = (m @ v.unsqueeze(-1)).squeeze(-1) if m.dim() == 3 else v @ m.t()
    if gain.excess is not None and not (_is_zero(out.es) and _is_zero(out.ex)):
        nn, p, gamma2, rho_s, rho_x = gain.excess
        extra = ((p - 1) * o.es + (nn - p) * o.ex) / (nn * gamma2)
        r = r - torch.stack([extra, rho_s * extra, rho_x * extra], dim=-1)
    r = r * (gain.k.unsqueeze(-1) if isinstance(gain.k, torch.Tensor) else float(gain.k))
    return Grad(r[:, 0].clamp_min(0.0), r[:, 1], r[:, 2])


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


def reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up the axes of two shapes of equal numel into groups whose sizes multiply
    to the same product (a reshape only merges or splits within a group). Size-1 axes
    belong to no group. None when the numels differ."""
    if math.prod(a) != math.prod(b):
        return None
    la = [k for k, n in enumerate(a) if n != 1]
    lb = [k for k, n in enumerate(b) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(la) and j < len(lb):
        ga, gb, pa, pb = [la[i]], [lb[j]], a[la[i]], b[lb[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ga.append(la[i])
                pa *= a[la[i]]
                i += 1
            else:
                gb.append(lb[j])
                pb *= b[lb[j]]
                j += 1
        groups.append((ga, gb))
    return groups


def reshaped_positions(pos: Sequence[int], in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, ...] | None:
    """Position axes after a reshape: the output axes of every group made only of input
    position axes; positions merged with channels or samples are lost."""
    groups = reshape_groups(in_shape, out_shape)
    if groups is None:
        return None
    out = [k for ga, gb in groups if all(i in pos for i in ga) for k in gb]
    return tuple(sorted(out)) or None
