"""The table of op handlers and what a handler reads (:class:`Ctx`) and returns
(:class:`Effect`), with the small helpers every family of handlers uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.ir import Node, Ref, Stats, TensorMeta

HANDLERS: dict[str, Callable[["Ctx"], "Effect"]] = {}


class Unhandled(Exception):
    """Raised by a handler for a variant it cannot model; the engine then estimates."""


def handles(*ops: str):
    """Register a handler for one or more normalised op names."""

    def deco(fn):
        for op in ops:
            if op in HANDLERS:
                raise ValueError(f"op {op!r} registered twice")
            HANDLERS[op] = fn
        return fn

    return deco


@dataclass
class Effect:
    """What a handler computed: output statistics and backward gains.

    ``gains`` holds ``(input node name, input leaf, output leaf, gain)`` tuples.
    """

    out: list[Stats | None]
    gains: list[tuple[str, int, int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Ctx:
    """What a handler may read: its node, input statistics and constant tensors."""

    def __init__(self, node: Node, engine) -> None:
        self.node = node
        self.engine = engine

    # -- arguments ---------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name`` of the call."""
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute of the called module (``stride``, ``eps``...)."""
        return getattr(self.node.fn, name, default)

    def stat(self, ref: Ref, leaf: int = 0) -> Stats:
        s = self.engine.leaf_stats(ref.name, leaf)
        if s is None:
            raise Unhandled(f"input '{ref.name}' has no floating statistics")
        return s

    def meta(self, ref: Ref, leaf: int = 0) -> TensorMeta:
        m = self.engine.graph[ref.name].outputs[leaf]
        if m is None:
            raise Unhandled(f"input '{ref.name}' has no tensor metadata")
        return m

    def const(self, ref: Any) -> torch.Tensor | None:
        """The real tensor behind ``ref`` when it is a parameter or constant."""
        if isinstance(ref, torch.Tensor):
            return ref
        if isinstance(ref, Ref):
            node = self.engine.graph[ref.name]
            if node.op == "param":
                return node.params.get("value")
        return None

    def layer_tensor(self, name: str, index: int) -> torch.Tensor | None:
        """A layer's ``weight`` or ``bias``: the module's parameter, or a functional op's
        argument ``index`` when it is a constant, else the value it is computed from
        parameters as (:func:`gradaudit.frontends.patterns.functional_layers` keeps it)."""
        if self.node.kind == "call_module":
            return self.param(name)
        value = self.const(self.arg(index, name))
        return value if value is not None else self.param(name)

    def param(self, name: str) -> torch.Tensor | None:
        p = self.node.params.get(name)
        return p.detach() if p is not None else None

    @property
    def out_meta(self) -> TensorMeta:
        m = self.node.outputs[0]
        if m is None:
            raise Unhandled("output is not a tensor")
        return m

    def first_ref(self) -> Ref:
        for a in self.node.args:
            if isinstance(a, Ref):
                return a
        for a in self.node.kwargs.values():
            if isinstance(a, Ref):
                return a
        raise Unhandled("no tensor input")


def make_stats(mean: float, m2: float, pos: tuple[int, ...] | None = None, cov: float = 0.0, xcov: float = 0.0) -> Stats:
    """Statistics of mean ``mean`` and second moment ``m2`` (at least mean^2); with position
    axes ``pos``, the covariance ``cov`` shared by the positions; ``xcov`` shared by the
    samples; both clipped to [-var, var]."""
    s = Stats(mean=float(mean), m2=max(float(m2), float(mean) ** 2))
    if pos is not None:
        s.pos, s.cov = pos, min(max(float(cov), -s.var), s.var)
    s.xcov = min(max(float(xcov), -s.var), s.var)
    return s


def numel_ratio(a: TensorMeta, b: TensorMeta) -> float:
    """numel(a) / numel(b) (0 for an empty b)."""
    return a.numel / b.numel if b.numel else 0.0


def position_count(meta: TensorMeta, axes) -> int:
    """Number of positions (product of the sizes of the position axes)."""
    return math.prod(meta.shape[a] for a in axes) if axes else 1


def as_tuple(v: Any, n: int) -> tuple:
    """``v`` as an n-tuple (a per-dimension setting given once or per dimension)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


#: Seed of the samplers that measure what has no closed form (softmax moments, the norm of
#: an interpolation's linear map): the same model always gets the same numbers.
SAMPLER_SEED = 20240521
