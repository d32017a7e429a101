"""The frontend-agnostic graph every stage after capture works on.

A frontend (torch.fx, ONNX, ...) turns a model into a :class:`Graph`: a list of
:class:`Node` in execution order. Each node names its normalised ``op`` (``"linear"``,
``"conv"``, ``"relu"``, ``"add"`` ...), its inputs as :class:`Ref` objects inside the
original argument structure, the owning module's qualified name, the parameters it
reads, the shapes of its outputs, and the user's source line.

Propagation writes :class:`Stats` for every node; rules read graph and stats together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


#: The ``module_type`` of a functional layer named after the parameter it reads (``x @
#: self.W``: the layer is ``W``), not after the parameter's owner.
PARAMETER_LAYER = "nn.Parameter"


def mean_value(t: Any) -> float:
    """``float(t.mean())`` of a tensor. For float64 on the CPU torch's mean is the sum
    divided by the count (ATen's ``mean_out``: ``sum_out(...).div_(numel)``), so the
    sum's value divided here is the same number, without the second kernel and tensor
    (the mean of a small vector costs twice its sum)."""
    n = t.numel()
    if n and t.dtype.is_floating_point and t.element_size() == 8 and t.device.type == "cpu":
        return float(t.sum()) / n
    return float(t.mean())


@dataclass(frozen=True)
class Location:
    """The user's source line that created a node."""

    path: str
    line: int
    code: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"

    def to_json(self) -> dict:
        return {"path": self.path, "line": self.line}


@dataclass(frozen=True)
class Ref:
    """A reference to the output of another node inside a node's arguments."""

    name: str


@dataclass
class TensorMeta:
    """Static facts about one tensor output: shape and dtype (from fake tensors)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float16", "bfloat16", "float32", "float64")


@dataclass
class Node:
    """One operation of the model.

    ``op`` is the normalised operation name that selects the propagation handler;
    ``args``/``kwargs`` hold the original arguments with every tensor-valued input
    replaced by a :class:`Ref`. ``outputs`` lists the :class:`TensorMeta` of each
    output (one for a plain tensor, several for a tuple; ``None`` for a non-tensor).
    ``fn`` is the callable that computes the node (a module instance or a function),
    kept so that unknown ops can be estimated by running them.
    """

    name: str
    op: str
    kind: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module: str | None = None
    module_type: str | None = None
    fn: Callable | None = None
    params: dict[str, Any] = field(default_factory=dict)
    outputs: list[TensorMeta | None] = field(default_factory=list)
    #: How the flat ``outputs`` nest: ``0`` for a single tensor, else nested tuples of
    #: leaf indices (``(0, (1, 2))`` for an LSTM's ``output, (h, c)``).
    structure: Any = 0
    location: Location | None = None

    @property
    def inputs(self) -> list[str]:
        """Names of the nodes this node reads, in argument order, without repeats."""
        seen: dict[str, None] = {}
        for ref in iter_refs((self.args, self.kwargs)):
            seen.setdefault(ref.name, None)
        return list(seen)

    @property
    def tuple_output(self) -> bool:
        return not isinstance(self.structure, int)

    @property
    def meta(self) -> TensorMeta | None:
        return self.outputs[0] if self.outputs else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        m = self.meta
        return m.shape if m is not None else None

    @property
    def has_params(self) -> bool:
        return bool(self.params)

    def describe(self) -> str:
        where = f" ({self.module_type} '{self.module}')" if self.module else ""
        loc = f" at {self.location}" if self.location else ""
        return f"node '{self.name}' [{self.op}]{where}{loc}"


def callable_of(node: Node) -> Callable:
    """What to call to compute ``node`` outside the model's own forward: a module's
    ``forward`` (so the user's hooks never see the audit's sampled or fake tensors),
    else the function itself."""
    fn = node.fn
    forward = getattr(fn, "forward", None)
    if forward is not None and hasattr(fn, "_forward_hooks"):
        return forward
    return fn


def in_place(node: Node) -> bool:
    """Whether ``node`` overwrites its input (``ReLU(inplace=True)``, ``relu_``, ``add_``)."""
    if getattr(node.fn, "inplace", False) or node.kwargs.get("inplace"):
        return True
    name = getattr(node.fn, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def structure_leaves(structure: Any) -> list[int]:
    """The leaf indices of a node's output ``structure`` (``(0, (1, 2))`` -> 0, 1, 2)."""
    if isinstance(structure, int):
        return [structure]
    return [i for s in structure for i in structure_leaves(s)]


def renumber(structure: Any) -> Any:
    """A sub-structure with its leaves counted from 0 (``(3, 4)`` -> ``(0, 1)``)."""
    counter = iter(range(1 << 62))

    def walk(s: Any) -> Any:
        return next(counter) if isinstance(s, int) else tuple(walk(x) for x in s)

    return walk(structure)


def iter_refs(obj: Any) -> Iterator[Ref]:
    """Every :class:`Ref` inside a nested structure of tuples, lists and dicts."""
    if isinstance(obj, Ref):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_refs(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_refs(item)


def map_refs(obj: Any, fn: Callable[[Ref], Any]) -> Any:
    """Rebuild a nested structure with every :class:`Ref` replaced by ``fn(ref)``."""
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_refs(item, fn) for item in obj)
    if isinstance(obj, list):
        return [map_refs(item, fn) for item in obj]
    if isinstance(obj, dict):
        return {k: map_refs(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class Graph:
    """Nodes in execution order, plus what the frontend knows about the model."""

    nodes: list[Node]
    frontend: str
    input_names: list[str] = field(default_factory=list)
    output_refs: list[str] = field(default_factory=list)
    #: For each input node, the example call's argument it comes from: ``"0"``, ``"1"``
    #: for positional ones, the keyword's name for keyword ones.
    input_args: list[str] = field(default_factory=list)
    #: One line per thing the capture wants the reader to know: why a cheaper capture
    #: failed, outputs left out of L.
    notes: list[str] = field(default_factory=list)
    #: The frontend's own program (the fx GraphModule), for stages that replay it.
    program: Any = None

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                users[src].append(n.name)
        self._users = users

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def users(self, name: str) -> list[Node]:
        return [self._by_name[u] for u in self._users[name]]


@dataclass
class Stats:
    """Second-moment statistics of one tensor, averaged over its elements.

    ``mean`` and ``m2`` describe the forward value (E[x] and E[x^2]); ``g2`` is the
    second moment of dL/dx with L = sum over outputs y of <y, g>, g ~ N(0, 1).

    When the tensor has a channel axis whose units differ (the output features of a
    Linear, the channels of a conv), ``axis`` names it and ``ch_mean`` / ``ch_m2`` /
    ``ch_g2`` hold per-channel values (float64 vectors); the scalars are then their
    averages. Tracking units separately keeps the actual weight draw's heterogeneity
    (a unit whose incoming weights sum to a large value is saturated for every sample)
    that a single Gaussian per tensor would average away.

    Coherence. Elements of one channel are not independent in a real network: a
    per-sample offset shared by all positions of an image or all tokens of a sequence
    (an attention output, a broadcast gate, a pooled gradient) survives averages over
    positions that independent values would not. ``pos`` names the position axes (None:
    unknown, no coherence tracked); with ``i``, ``j`` two elements of the same channel:

    - ``cov``: Cov(x_i, x_j) for i, j in the same sample (equal on every axis but the
      position axes), different positions -- the variance of the part of x that is
      shared by all positions of a sample (a random-effects model, Searle et al. 1992);
    - ``gs``: E[g_i g_j] for the same pair (gradient, same sample);
    - ``gx``: E[g_i g_j] for i, j in different samples (a gradient part shared by the
      whole batch; negative after a batch normalization removed the batch mean).

    - ``xcov``: Cov(x_i, x_j) for i, j in different samples of one batch -- a part shared
      by the whole batch. Independent inputs have none; a batch normalization creates a
      negative one (each channel's batch sums to 0), which the ReLUs, convolutions and
      residual sums after it carry to the next batch normalization, whose batch mean
      then varies less than independent values' would (E[s^2] = var - Var(batch mean)).

    Each has a per-channel vector (``ch_cov``, ``ch_gs``, ``ch_gx``, ``ch_xcov``) when
    channels are tracked.

    Rows (the values along the channel axis at one position, what a LayerNorm
    normalises): ``row_var`` is the variance of a row's mean square (None: that of
    independent Gaussian channels; 0 after a LayerNorm with uniform gain); ``gdm`` /
    ``gda`` the gradient power missing along a row's mean and centred directions
    (:class:`gradaudit.propagation.channels.Grad`).

    Positions differ too: behind a zero-padded convolution border positions collect
    fewer taps, and through a deep unnormalised stack the interior's variance outgrows
    theirs. ``prof`` / ``gprof``: the relative E[x^2] / E[g^2] along each position axis
    (vectors of mean 1, in the order of ``pos``; None when flat). ``ges`` / ``gex``: the
    gradient's correlation with the value itself (:class:`~gradaudit.propagation.channels.Grad`).

    ``row_spread``: E[mean_c (x_c - xbar)^2] along the channel axis ``axis``, xbar the
    mean of one row (one position of one sample) -- what a softmax over the channels
    sees, blind to the part all channels of a row share
    (:mod:`gradaudit.propagation.rows`). None: not tracked (channels independent); else a
    ``rows.Spread`` that computes it on first use (:meth:`spread`, :meth:`equal_rows`).

    ``positive``: the values are >= 0 and skewed (a mean of squares, a variance): a Gamma
    of the same mean and variance describes them better than a Gaussian, which would put
    mass on negative values (where ``rsqrt`` or ``log`` are undefined).
    """

    mean: float
    m2: float
    g2: float = 0.0
    estimated: bool = False
    axis: int | None = None
    ch_mean: Any = None
    ch_m2: Any = None
    ch_g2: Any = None
    pos: tuple[int, ...] | None = None
    cov: float = 0.0
    ch_cov: Any = None
    gs: float = 0.0
    ch_gs: Any = None
    gx: float = 0.0
    ch_gx: Any = None
    xcov: float = 0.0
    ch_xcov: Any = None
    #: third central moment E[(x - mu)^3] (``ch_k3`` per channel): a ReLU's output is
    #: skewed, and so is a residual sum that adds one to a Gaussian branch
    k3: float = 0.0
    ch_k3: Any = None
    positive: bool = False
    row_var: float | None = None
    gdm: float = 0.0
    gda: float = 0.0
    prof: tuple | None = None
    gprof: tuple | None = None
    ges: Any = 0.0
    gex: Any = 0.0
    row_spread: Any = None

    @classmethod
    def per_channel(cls, axis: int, mean, m2, cov=None, pos: tuple[int, ...] | None = None, xcov=None) -> "Stats":
        """Stats from per-channel mean, second-moment (and coherent covariance) vectors
        (torch float64). The covariances are kept within [-var, var] (negative after a
        normalization removed a batch or group mean)."""
        import torch

        sq = mean * mean
        m2 = m2.maximum(sq)
        s = cls(mean=mean_value(mean), m2=mean_value(m2), axis=axis, ch_mean=mean, ch_m2=m2, pos=pos)
        var = m2 - sq
        if cov is not None and pos is not None:
            cov = torch.minimum(cov.maximum(-var), var)
            s.ch_cov, s.cov = cov, mean_value(cov)
        if xcov is not None:
            xcov = torch.minimum(xcov.maximum(-var), var)
            s.ch_xcov, s.xcov = xcov, mean_value(xcov)
        return s

    def spread(self) -> float | None:
        """``row_spread``'s value (None: not tracked)."""
        return self.row_spread.value() if self.row_spread is not None else None

    def equal_rows(self) -> bool:
        """Whether every channel of a row holds the same value (a spread of 0)."""
        return self.row_spread is not None and self.row_spread.is_zero()

    @property
    def has_channels(self) -> bool:
        return self.axis is not None and self.ch_mean is not None

    def channels(self, axis: int, n: int):
        """(mean, var) vectors for ``n`` channels on ``axis``; uniform if not tracked."""
        import torch

        if self.has_channels and self.axis == axis and self.ch_mean.numel() == n:
            return self.ch_mean, (self.ch_m2 - self.ch_mean * self.ch_mean).clamp_min(0.0)
        return (
            torch.full((n,), self.mean, dtype=torch.float64),
            torch.full((n,), self.var, dtype=torch.float64),
        )

    def _vector(self, vec, scalar: float, axis: int | None, n: int):
        """``vec`` when it is this value's per-channel vector over ``n`` channels on
        ``axis``, else ``scalar`` repeated n times."""
        import torch

        if vec is not None and self.has_channels and self.axis == axis and vec.numel() == n:
            return vec
        return torch.full((n,), scalar, dtype=torch.float64)

    def coherent(self, axis: int | None, n: int):
        """The coherent covariance as a vector over ``n`` channels on ``axis``."""
        return self._vector(self.ch_cov, self.cov, axis, n)

    def third(self, axis: int | None, n: int):
        """The third central moment as a vector over ``n`` channels on ``axis``."""
        return self._vector(self.ch_k3, self.k3, axis, n)

    def cross(self, axis: int | None, n: int):
        """The cross-sample covariance as a vector over ``n`` channels on ``axis``."""
        return self._vector(self.ch_xcov, self.xcov, axis, n)

    def scalar(self) -> "Stats":
        """The same statistics without channel detail (the coherent covariances kept).

        The mean's spread over channels becomes variance; it is shared by every
        position of a sample, so it is coherent too."""
        cov = self.cov + (self.mean_spread if self.pos is not None else 0.0)
        return Stats(mean=self.mean, m2=self.m2, estimated=self.estimated, pos=self.pos, cov=cov, positive=self.positive, xcov=self.xcov)

    def set_cross(self, xcov) -> None:
        """Set the cross-sample covariance (a vector per channel when channels are
        tracked), clipped to [-var, var]."""
        import torch

        if self.has_channels and isinstance(xcov, torch.Tensor) and xcov.numel() == self.ch_mean.numel():
            var = (self.ch_m2 - self.ch_mean**2).clamp_min(0.0)
            xcov = torch.minimum(xcov.maximum(-var), var)
            self.ch_xcov, self.xcov = xcov, mean_value(xcov)
        else:
            v = mean_value(xcov) if isinstance(xcov, torch.Tensor) else float(xcov)
            self.xcov = min(max(v, -self.var), self.var)

    def set_third(self, k3) -> None:
        """Set the third central moment (a per-channel vector when channels are tracked)."""
        if self.has_channels and hasattr(k3, "numel") and k3.numel() == self.ch_mean.numel():
            self.ch_k3, self.k3 = k3, mean_value(k3)
        else:
            self.k3 = float(k3.mean()) if hasattr(k3, "mean") else float(k3)

    @property
    def mean_spread(self) -> float:
        """Variance of the per-channel means around their average (0 without channels)."""
        if not self.has_channels:
            return 0.0
        return max(mean_value(self.ch_mean * self.ch_mean) - self.mean * self.mean, 0.0)

    @property
    def var(self) -> float:
        return max(self.m2 - self.mean * self.mean, 0.0)

    @property
    def act_rms(self) -> float:
        return math.sqrt(max(self.m2, 0.0))

    @property
    def grad_rms(self) -> float:
        return math.sqrt(max(self.g2, 0.0))

    def scale_grad(self, factor: float) -> None:
        """Multiply every gradient moment (second moments, coherent parts, missing power
        along row directions, value alignments) by ``factor``."""
        for key in ("g2", "gs", "gx", "gdm", "gda", "ch_g2", "ch_gs", "ch_gx", "ges", "gex"):
            v = getattr(self, key)
            if v is not None:
                setattr(self, key, v * factor)
