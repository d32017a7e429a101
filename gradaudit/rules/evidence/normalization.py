"""Normalizations over too few values: how many values each statistic of a normalization
node comes from, and the nodes whose gradient one over one or two values cuts off."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradaudit.rules.evidence.structure import reaching_outputs

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis


def norm_samples(node: Node) -> int | None:
    """How many values a normalization node computes each of its statistics from, with
    the example inputs' shapes: BatchNorm N x spatial per channel, InstanceNorm spatial,
    GroupNorm (C / G) x spatial, LayerNorm the normalized shape. None for other ops."""
    shape = node.shape
    if not shape or node.op not in ("batch_norm", "instance_norm", "group_norm", "layer_norm"):
        return None
    numel = math.prod(shape)
    if node.op == "batch_norm":
        return numel // shape[1] if len(shape) > 1 else shape[0]
    if node.op == "instance_norm":
        return math.prod(shape[2:]) if len(shape) > 2 else 1
    if node.op == "group_norm":
        groups = getattr(node.fn, "num_groups", None)
        if groups is None:
            groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
        return numel // (shape[0] * int(groups)) if isinstance(groups, int) and groups > 0 else None
    normalized = getattr(node.fn, "normalized_shape", None)
    if normalized is None:
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if isinstance(normalized, int):
        normalized = (normalized,)
    if isinstance(normalized, (tuple, list)) and all(isinstance(d, int) for d in normalized):
        return math.prod(normalized)
    return None


#: A normalization over at most this many values passes no gradient at all: with one
#: value its output is constant, with two it is +-1 whatever the input.
DEGENERATE_SAMPLES = 2


def cut_off_by_degenerate_norms(analysis: Analysis) -> set[str]:
    """Nodes whose every path to an output crosses a normalization over at most
    :data:`DEGENERATE_SAMPLES` values: their gradient is zero (one value) or set by the
    normalization's eps (two values), because of the example inputs' size, not the
    model (GA305)."""
    def degenerate(node) -> bool:  # the gradient stops here
        n = norm_samples(node)
        return n is not None and n <= DEGENERATE_SAMPLES

    free = reaching_outputs(analysis, degenerate)
    return {n.name for n in analysis.graph if n.name not in free}
