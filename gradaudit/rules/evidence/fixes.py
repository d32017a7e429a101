"""Fix lines: the one line of code a finding proposes (an init, a normalization, another
activation), and the layer to apply it to first."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradaudit.rules.evidence.inits import init_mismatch, layer_inits, leaky_slope
from gradaudit.rules.evidence.ops import RELU_FAMILY, SATURATING
from gradaudit.rules.evidence.profiles import layer_grad
from gradaudit.rules.evidence.structure import has_successor, next_activation, next_activation_node
from gradaudit.rules.evidence.text import module_expr, weight_name

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis


def init_fix(analysis: Analysis, node: Node) -> str:
    """The init line that keeps this layer's gain at what the next activation needs."""
    act, act_node = next_activation_node(analysis, node)
    target = module_expr(weight_name(node)) if node.module else "layer.weight"
    if act == "leaky_relu":
        return f"nn.init.kaiming_normal_({target}, a={leaky_slope(act_node):g}, nonlinearity='leaky_relu')"
    if act in RELU_FAMILY:
        return f"nn.init.kaiming_normal_({target}, nonlinearity='relu')"
    if act == "selu":
        return f"nn.init.kaiming_normal_({target}, nonlinearity='linear')  # LeCun normal for SELU"
    return f"nn.init.kaiming_normal_({target}, nonlinearity='linear')  # LeCun normal: n Var[w] = 1"


def features(node: Node) -> int | None:
    """Feature count a norm after ``node`` would take (channels for conv, last dim else)."""
    shape = node.shape
    if not shape:
        return None
    return shape[1] if node.op == "conv" and len(shape) > 2 else shape[-1]


def norm_ctor(node: Node) -> str:
    n = features(node)
    shape = node.shape or ()
    if node.op == "conv" and len(shape) in (3, 4, 5):
        return f"nn.BatchNorm{len(shape) - 2}d({n})"
    return f"nn.LayerNorm({n})"


def add_norm_fix(node: Node) -> str:
    """One line that puts a normalization layer right after ``node``'s module."""
    if node.module:
        expr = module_expr(node.module)
        return f"{expr} = nn.Sequential({expr}, {norm_ctor(node)})"
    return f"x = {norm_ctor(node)}(x)  # after the layer at {node.location or node.name}"


def swap_activation_fix(analysis: Analysis, node: Node) -> str:
    """One line replacing the saturating activation after ``node`` by a ReLU."""
    act, act_node = next_activation_node(analysis, node)
    if act_node is not None and act_node.kind == "call_module" and act_node.module:
        return (
            f"{module_expr(act_node.module)} = nn.ReLU()  # was {act_node.module_type}; "
            f"then nn.init.kaiming_normal_(..., nonlinearity='relu') on the layers"
        )
    loc = f" at {act_node.location}" if act_node is not None and act_node.location else ""
    return f"x = torch.relu(x)  # instead of {act or 'the activation'}{loc}; He init for the layers"


def culprit_layer(analysis: Analysis, layers) -> tuple[object, str] | None:
    """The weight layer to fix first, with its fix line.

    1. A hidden layer whose n Var[w] is off by more than 2x from what its activation
       needs (:func:`init_mismatch`): the worst one (the earliest among those within 10% of
       the worst), fixed by an init line.
    2. Else, when most layers feed a saturating activation, the activation is the culprit
       (sigmoid' <= 1/4 caps the gain whatever the init or normalization): replace it.
    3. Else the linear/conv layer with the largest predicted change of gradient RMS, by
       an init line; None when there is no linear/conv layer to re-initialise.
    """
    if not layers:
        return None
    scores = []
    for n in layers:
        m = init_mismatch(analysis, n) if has_successor(analysis, n) else None
        scores.append(abs(math.log2(m)) if m is not None and m > 0 else 0.0)
    top = max(scores)
    if top > 1.0:
        worst = next(n for n, s in zip(layers, scores) if s >= 0.9 * top)
        return worst, init_fix(analysis, worst)
    acts = [next_activation(analysis, n) for n in layers]
    sat = [n for n, a in zip(layers, acts) if a in SATURATING]
    if sat and len(sat) >= len(layers) // 2:
        return sat[0], swap_activation_fix(analysis, sat[0])
    inits = layer_inits(analysis)
    grads = [layer_grad(analysis, n) for n in layers]
    worst, score = None, -1.0
    for i in range(len(layers) - 1):
        a, b = grads[i], grads[i + 1]
        if layers[i].name in inits and a > 0 and b > 0:
            s = abs(math.log(a / b))
            if s > score:
                worst, score = layers[i], s
    return (worst, init_fix(analysis, worst)) if worst is not None else None


def culprit_fix(analysis: Analysis, layers) -> str | None:
    """The fix line of :func:`culprit_layer`, or None."""
    culprit = culprit_layer(analysis, layers)
    return culprit[1] if culprit else None
