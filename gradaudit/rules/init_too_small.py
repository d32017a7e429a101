"""GA202 init-too-small."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules import _init_scale
from gradaudit.rules.base import Finding, Rule, register


@register
class InitTooSmall(Rule):
    """Weights initialised more than 2x below the gain the next activation needs, over depth.

    ## What it does
    For every linear/conv layer compares the effective gain of its actual weights,
    n Var[w] (n = fan-in, measured as n E[w^2] over the rows), with the gain that keeps
    the second moment constant through the activation that follows: 2 (He) for the ReLU
    family, 1 (LeCun / Xavier) for tanh, sigmoid and linear layers, 1 (LeCun) for SELU.
    It reports the longest plain stack (no normalization, no residual add between) of
    hidden layers that are more than 2x too small (setting ``init_tolerance``) when the
    predicted activation or gradient RMS compounds across it by at least 10x (setting
    ``init_compound_decades``). Layers followed by normalization are not reported, nor
    Xavier-scaled layers before ReLU (GA203 covers them).

    ## Why is this bad?
    Each such layer multiplies the signal's second moment by the shortfall. PyTorch's
    default Linear/Conv init, U(+-1/sqrt(fan_in)), has n Var[w] = 1/3: through ReLU the
    forward variance shrinks 6x per layer until the bias dominates (q* = 2 / (5 fan_in)),
    and the gradient's second moment shrinks 6x per layer on its way back.

    ## Example
    ```python
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(256, 256), nn.ReLU())])
    # default init: n Var[w] = 1/3, ReLU needs 2
    ```

    ## Use instead
    ```python
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    ```

    ## References
    - He et al., "Delving Deep into Rectifiers", ICCV 2015.
    - LeCun et al., "Efficient BackProp", 1998.
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017.
    """

    code = "GA202"
    name = "init-too-small"
    category = "init"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        yield from _init_scale.check(self, analysis, -1)
