"""Did the prediction reach every weight layer? The guard against a false all-clear.

An audit may only call a model healthy when it put finite statistics on every layer that
owns parameters and the loss reaches at least one of them. :func:`check` lists every
*gap* that breaks this, each with its root cause:

- a layer without statistics: the node upstream of it where statistics stopped (an op
  that neither a handler nor the local Monte Carlo could model, an input without floating
  statistics), with the reason and the user's source line;
- a non-finite prediction (nan / inf): the first node, in execution order, whose predicted
  forward statistics are not finite, and the node nearest the output whose predicted
  gradient is not finite. A non-finite number is a failure of the analysis, never a value
  to skip;
- an output with no floating tensor, or a predicted gradient of exactly 0 on every layer:
  the loss reaches no parameter;
- a model without parameters: there is nothing to train.

Any gap makes the verdict ``incomplete`` (exit status 4 on the command line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node, Stats
    from gradaudit.propagation.engine import Analysis


@dataclass
class Gap:
    """One reason the statistics do not cover the model."""

    reason: str
    node: str | None = None
    op: str | None = None
    module: str | None = None
    location: object = None  # gradaudit.ir.Location
    #: Qualified names (or node names) of the parameterized layers this gap leaves
    #: without usable statistics.
    layers: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "reason": self.reason,
            "node": self.node,
            "op": self.op,
            "module": self.module,
            "location": self.location.to_json() if self.location is not None else None,
            "layers": list(self.layers),
        }


@dataclass
class Coverage:
    """How many parameterized layers got finite statistics, and why the others did not."""

    layers: int
    with_statistics: int
    gaps: list[Gap] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.gaps

    def to_json(self) -> dict:
        return {
            "complete": self.complete,
            "layers": self.layers,
            "layers_with_statistics": self.with_statistics,
            "gaps": [g.to_json() for g in self.gaps],
        }

    def sentence(self) -> str:
        """One line for a headline: what is missing, and the first cause."""
        if self.complete:
            return f"statistics on all {self.layers} parameterized layers"
        first = self.gaps[0]
        where = f" at {first.location}" if first.location is not None else ""
        at = f"node '{first.node}'{where}: " if first.node else ""
        if self.layers and self.with_statistics < self.layers:
            head = f"no usable statistics on {self.layers - self.with_statistics} of {self.layers} parameterized layers; "
        else:
            head = ""
        return f"{head}{at}{first.reason}"


def finite_stats(s: Stats | None) -> bool:
    """Whether ``s`` exists and its forward and gradient moments are all finite numbers."""
    if s is None:
        return False
    return all(math.isfinite(v) for v in (s.mean, s.m2, s.g2))


def parameter_layers(analysis: Analysis) -> list[Node]:
    """Every node that owns or reads a trainable parameter, in execution order: the
    analysis's layers (calls of modules owning parameters, functional layers, whose weight
    may be computed from parameters), and every other op reading an ``nn.Parameter`` or a
    value a frontend computed from parameters alone (torch.export folds ``self.w.t()``
    into such a constant)."""
    import torch.nn as nn

    from gradaudit.frontends.patterns import SOURCE

    graph = analysis.graph
    out: dict[str, Node] = {n.name: n for n in analysis.layers()}
    for n in graph:
        if n.op == "param" and (isinstance(n.params.get("value"), nn.Parameter)
                                or any(k.startswith(SOURCE) for k in n.params)):
            for user in graph.users(n.name):
                if user.op not in ("output", "param"):
                    out.setdefault(user.name, user)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(out.values(), key=lambda n: order[n.name])


def _label(node: Node, graph=None) -> str:
    """The qualified name a person knows the layer by: its module, or for a functional op
    reading a parameter, that parameter's qualified name."""
    if node.module:
        return node.module
    if graph is not None:
        for src in node.inputs:
            p = graph[src]
            if p.op == "param" and p.module:
                return p.module
    return node.name


def _layer_stats(analysis: Analysis, node: Node) -> list:
    return [s for s in analysis.stats.get(node.name, []) if s is not None]


def _root_cause(analysis: Analysis, node: Node, failed: dict[str, str]) -> tuple[Node, str]:
    """The earliest node upstream of ``node`` (itself included) without statistics whose
    own floating inputs all have them: where the statistics stopped, and why."""
    graph = analysis.graph
    seen: set[str] = set()
    stack = [node]
    best = node
    while stack:
        cur = stack.pop()
        if cur.name in seen:
            continue
        seen.add(cur.name)
        missing = [graph[s] for s in cur.inputs if not analysis.stats.get(s) or all(x is None for x in analysis.stats[s])]
        missing = [m for m in missing if any(o is not None and o.is_float for o in m.outputs) or m.op == "input"]
        if not missing:
            best = cur
            break
        stack.extend(missing)
        best = missing[0]
    if best.name in failed:
        return best, failed[best.name]
    if best.op == "input":
        return best, f"input '{best.name}' has no floating statistics (a non-tensor or integer input the model uses as a number)"
    return best, "no statistics could be computed for this op"


def check(analysis: Analysis, *, model_has_parameters: bool = True) -> Coverage:
    """The :class:`Coverage` of ``analysis`` (see the module docstring)."""
    layers = parameter_layers(analysis)
    gaps: list[Gap] = []
    if not layers:
        if model_has_parameters:
            gaps.append(Gap("the forward uses none of the model's parameters: no gradient can reach them"))
        else:
            gaps.append(Gap("the model has no parameters: there is nothing for gradients to train"))
        return Coverage(0, 0, gaps)

    failed = {e.node: e.reason for e in analysis.estimates if not e.ok}
    by_cause: dict[str, Gap] = {}
    covered = 0
    for layer in layers:
        stats = _layer_stats(analysis, layer)
        if stats and all(finite_stats(s) for s in stats):
            covered += 1
            continue
        if stats:
            continue  # non-finite: reported once below, at the node where it started
        cause, reason = _root_cause(analysis, layer, failed)
        gap = by_cause.get(cause.name)
        if gap is None:
            gap = by_cause[cause.name] = Gap(reason, cause.name, cause.op, cause.module, cause.location)
            gaps.append(gap)
        gap.layers.append(_label(layer, analysis.graph))

    gaps += _nonfinite_gaps(analysis, layers)

    graph = analysis.graph
    floating = [m for name in graph.output_refs for m in graph[name].outputs if m is not None and m.is_float]
    if not floating:
        gaps.append(Gap("the model's output holds no floating tensor: no loss can reach a parameter"))
    elif covered == len(layers) and all(s.g2 == 0 for layer in layers for s in _layer_stats(analysis, layer)):
        gaps.append(
            Gap("the predicted gradient is exactly 0 on every parameterized layer: the loss reaches no parameter "
                "(is the output detached, or computed without the parameters?)",
                layers=[_label(n, analysis.graph) for n in layers])
        )
    return Coverage(len(layers), covered, gaps)


def _nonfinite_gaps(analysis: Analysis, layers: list[Node]) -> list[Gap]:
    """The first node with a non-finite forward prediction and the last with a non-finite
    gradient prediction (execution order), with the layers they poison."""
    gaps: list[Gap] = []
    bad_layers = [
        _label(n, analysis.graph) for n in layers
        if (st := _layer_stats(analysis, n)) and not all(finite_stats(s) for s in st)
    ]
    first_fwd = next(
        (n for n in analysis.graph if any(not (math.isfinite(s.mean) and math.isfinite(s.m2))
                                          for s in analysis.stats.get(n.name, []) if s is not None)),
        None,
    )
    if first_fwd is not None:
        bad = next(s for s in analysis.stats[first_fwd.name] if s is not None and not math.isfinite(s.m2 + s.mean))
        gaps.append(Gap(
            f"the predicted activation statistics are not finite here (second moment {bad.m2:g}): "
            "the analysis cannot model this op for these inputs",
            first_fwd.name, first_fwd.op, first_fwd.module, first_fwd.location, bad_layers,
        ))
        return gaps
    last_bwd = next(
        (n for n in reversed(analysis.graph.nodes)
         if any(not math.isfinite(s.g2) for s in analysis.stats.get(n.name, []) if s is not None)),
        None,
    )
    if last_bwd is not None:
        gaps.append(Gap(
            "the predicted gradient statistics are not finite from here back to the input: "
            "the analysis cannot model this op's backward for these inputs",
            last_bwd.name, last_bwd.op, last_bwd.module, last_bwd.location, bad_layers,
        ))
    return gaps
