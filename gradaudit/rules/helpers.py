"""Small shared helpers for rules: what follows a layer, which fix line fits it."""

from __future__ import annotations

from gradaudit.propagation.depth import DepthSummary
from gradaudit.propagation.engine import ACTIVATIONS, Analysis

#: Ops that pass a value through without changing what "the next activation" is.
TRANSPARENT = frozenset(
    {"dropout", "identity", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "to", "getitem"}
)
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid"})
RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "gelu", "silu", "mish", "hardswish"})


def depth_rate_text(depth: DepthSummary) -> str:
    lpd = depth.layers_per_decade
    if lpd is None:
        return "the trend across layers is flat"
    word = "fall" if depth.decades_per_layer < 0 else "grow"
    return f"at this rate gradients {word} 10x every {lpd:.1f} layers"


def next_activation(analysis: Analysis, node) -> str | None:
    """The activation op applied to ``node``'s output, looking through norms/dropout."""
    for user in analysis.next_nodes(node, TRANSPARENT | {"batch_norm", "layer_norm", "group_norm"}):
        if user.op in ACTIVATIONS:
            return user.op
    return None


def init_fix(analysis: Analysis, node) -> str:
    """The init line that keeps this layer's gain at 1 for the activation that follows."""
    act = next_activation(analysis, node)
    target = f"model.{node.module}.weight" if node.module else "layer.weight"
    if act in RELU_FAMILY:
        return f"nn.init.kaiming_normal_({target}, nonlinearity='relu')"
    if act == "selu":
        return f"nn.init.kaiming_normal_({target}, nonlinearity='linear')  # LeCun normal for SELU"
    if act == "tanh":
        return f"nn.init.xavier_normal_({target}, gain=nn.init.calculate_gain('tanh'))"
    if act == "sigmoid":
        return f"nn.init.xavier_normal_({target})  # and prefer ReLU/GELU over stacked sigmoids"
    return f"nn.init.xavier_normal_({target})"


def culprit_layer(analysis: Analysis, layers) -> tuple[object, str] | None:
    """The weight layer whose activation most shrinks or grows the gradient, with a fix."""
    acts = [next_activation(analysis, n) for n in layers]
    sat = [n for n, a in zip(layers, acts) if a in SATURATING]
    if len(sat) >= len(layers) // 2 and sat:
        kind = next_activation(analysis, sat[0])
        return sat[0], f"replace nn.{'Sigmoid' if kind == 'sigmoid' else 'Tanh'}() with nn.ReLU() and add nn.LayerNorm between layers"
    if layers:
        return layers[0], init_fix(analysis, layers[0])
    return None
