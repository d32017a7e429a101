"""Sets of op names the rules look for or look through."""

from __future__ import annotations

#: Ops that pass a value through without changing what "the next activation" is.
TRANSPARENT = frozenset(
    {
        "dropout", "alpha_dropout", "identity", "view", "reshape", "flatten", "unflatten", "permute",
        "transpose", "contiguous", "to", "getitem", "squeeze", "unsqueeze", "clone",
    }
)
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid"})
RELU_FAMILY = frozenset(
    {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "gelu", "silu", "mish", "hardswish"}
)
NORMS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
#: Ops whose weight is a matrix mapping fan_in inputs to each output unit.
DENSE_OPS = frozenset({"linear", "conv"})
