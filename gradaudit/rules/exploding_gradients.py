"""GA102 exploding-gradients."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import gradient_crossing, where


@register
class ExplodingGradients(Rule):
    """Predicted gradients grow by 1000x or more between the output and the first layers.

    ## What it does
    Reports when the predicted gradient reaching the earliest weight layers is at least
    1e3 times the gradient at the last weight layer (error), or when the fitted
    per-layer trend would reach 1e3 within twice the model's depth (warning). The
    prediction propagates the second moment of dL/d(activation) backward through every
    op's Jacobian, from the weights the model was initialised with. The gradient
    reaching a weight layer is the RMS of dL/d(output) times sqrt(P), P the positions
    per sample that share each weight (spatial positions of a conv, sequence positions
    of a linear layer; 1 in an MLP): dL/dW sums over them, so a global average pool,
    which divides each position's gradient by P, does not read as vanishing. The message
    names the layer where the gradient crosses 1e3 and the rate ("gradients grow 10x
    every 3.1 layers").

    ## Why is this bad?
    The first layers get updates orders of magnitude larger than the last: any learning
    rate small enough for them freezes the rest, and one large enough for the rest makes
    them diverge (loss goes to NaN). In mean-field terms the per-layer gain
    chi_1 = sigma_w^2 E[phi'(h)^2] is above 1 (the chaotic phase) and the gradient's
    second moment grows like chi_1^depth. A ReLU layer with n Var[w] = 4 (twice He) has
    chi_1 = 2: the gradient RMS grows 1.41x per layer, 1000x over 21 layers.

    ## Example
    ```python
    layers = []
    for _ in range(24):
        layer = nn.Linear(256, 256)
        nn.init.normal_(layer.weight, std=2 / 256 ** 0.5)   # n Var[w] = 4
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    for _ in range(24):
        layer = nn.Linear(256, 256)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")   # n Var[w] = 2
        layers += [layer, nn.ReLU()]
    ```

    ## References
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017.
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013.
    - He et al., "Delving Deep into Rectifiers", ICCV 2015.
    """

    code = "GA102"
    name = "exploding-gradients"
    category = "exploding"
    default_severity = "error"

    def check(self, analysis) -> Iterator[Finding]:
        c = gradient_crossing(analysis, +1)
        if c is None:
            return
        prof = c.profile
        layers, grads, rate = prof.layers, prof.grads, prof.rate_text
        if c.cross is not None:
            node = layers[c.cross]
            ratio = grads[0] / grads[-1]
            yield self.finding(
                f"predicted gradient grows {ratio:.3g}x from the last weight layer to the first "
                f"({prof.end_to_end_decades:+.1f} decades over {len(layers)} layers); it crosses "
                f"{c.limit:.0e} times the last layer's at layer {c.cross + 1} of {len(layers)} ('{where(node)}'); "
                f"{rate}",
                node=node,
                fix=c.fix,
                ratio=ratio,
                decades=prof.end_to_end_decades,
                layer_index=c.cross + 1,
                decades_per_layer=prof.decades_per_layer,
            )
        elif c.reach is not None:
            yield self.finding(
                f"predicted gradients grow toward the input ({prof.end_to_end_decades:+.1f} decades over "
                f"{len(layers)} layers): {rate}; at this rate they reach {c.limit:.0e} times the last layer's "
                f"after {c.reach:.0f} layers (this model has {len(layers)})",
                node=layers[0],
                fix=c.fix,
                severity="warning",
                explode_depth=c.reach,
                decades_per_layer=prof.decades_per_layer,
            )
