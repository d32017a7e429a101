"""GA201 init-too-large."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules import _init_scale
from gradaudit.rules.base import Finding, Rule, register


@register
class InitTooLarge(Rule):
    """Weights initialised more than 2x above the gain the next activation needs, over depth.

    ## What it does
    For every linear/conv layer compares the effective gain of its actual weights,
    n Var[w] (n = fan-in, measured as n E[w^2] over the rows), with the gain that keeps
    the second moment constant through the activation that follows: 2 (He) for the ReLU
    family (2 / (1 + a^2) for leaky ReLU), 1 (LeCun / Xavier) for tanh, sigmoid and
    linear layers, 1 (LeCun) for SELU. It reports the longest plain stack (no
    normalization, no residual add between) of hidden layers that are more than 2x too
    large (setting ``init_tolerance``) when the predicted activation or gradient RMS
    compounds across it by at least 10x (setting ``init_compound_decades``, 1). A layer
    followed by BatchNorm/LayerNorm is never reported: the norm rescales it.

    ## Why is this bad?
    Each such layer multiplies the signal's second moment by the excess: with fan-in
    100 and sigma_w = 0.5 the variance grows 25x per layer. ReLU activations and
    gradients grow geometrically (chi_1 = n Var[w] / 2 > 1, the chaotic phase of
    Schoenholz et al. 2017); bounded activations saturate, so their forward signal looks
    fine while the gradient still explodes.

    ## Example
    ```python
    layers = []
    for _ in range(10):
        layer = nn.Linear(100, 100)
        nn.init.normal_(layer.weight, std=0.5)      # n Var[w] = 25, ReLU needs 2
        layers += [layer, nn.ReLU()]
    ```

    ## Use instead
    ```python
    for _ in range(10):
        layer = nn.Linear(100, 100)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        layers += [layer, nn.ReLU()]
    ```

    ## References
    - He et al., "Delving Deep into Rectifiers", ICCV 2015.
    - LeCun et al., "Efficient BackProp", 1998.
    - Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS 2010.
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017.
    """

    code = "GA201"
    name = "init-too-large"
    category = "init"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        yield from _init_scale.check(self, analysis, +1)
