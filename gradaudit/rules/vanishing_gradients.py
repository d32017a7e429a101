"""GA101 vanishing-gradients."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import gradient_crossing, where


@register
class VanishingGradients(Rule):
    """Predicted gradients shrink by 1000x or more between the output and the first layers.

    ## What it does
    Reports when the predicted gradient reaching the earliest weight layers is at most
    1e-3 of the gradient at the last weight layer (error), or when the fitted per-layer
    trend would reach 1e-3 within twice the model's depth (warning). The prediction
    propagates the second moment of dL/d(activation) backward through every op's
    Jacobian, from the weights the model was initialised with. The gradient reaching a
    weight layer is the RMS of dL/d(output) times sqrt(P), P the positions per sample
    that share each weight (spatial positions of a conv, sequence positions of a linear
    layer; 1 in an MLP): dL/dW sums over them, so a global average pool, which divides
    each position's gradient by P, does not read as vanishing. The message names the
    layer where the gradient crosses 1e-3 and the rate ("gradients fall 10x every 4.2
    layers").

    ## Why is this bad?
    The first layers receive almost no gradient: they barely move, so a deep model
    trains like a shallow one, or not at all. In mean-field terms the per-layer gain
    chi_1 = sigma_w^2 E[phi'(h)^2] is below 1 and the gradient's second moment decays
    like chi_1^depth (depth scale xi = -1/ln chi_1; networks train roughly when depth
    < 6 xi). A sigmoid layer with Xavier init has chi_1 ~ 1/16: the gradient RMS falls
    4x per layer.

    ## Example
    ```python
    layers = []
    for _ in range(20):
        layer = nn.Linear(256, 256)
        nn.init.xavier_normal_(layer.weight)
        layers += [layer, nn.Sigmoid()]   # sigmoid'(x) <= 1/4
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    for _ in range(20):
        layer = nn.Linear(256, 256)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        layers += [layer, nn.LayerNorm(256), nn.ReLU()]
    ```

    ## References
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017.
    - Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS 2010.
    - Hochreiter, "Untersuchungen zu dynamischen neuronalen Netzen", 1991.
    """

    code = "GA101"
    name = "vanishing-gradients"
    category = "vanishing"
    default_severity = "error"

    def check(self, analysis) -> Iterator[Finding]:
        c = gradient_crossing(analysis, -1)
        if c is None:
            return
        prof = c.profile
        layers, grads, rate = prof.layers, prof.grads, prof.rate_text
        if c.cross is not None:
            node = layers[c.cross]
            ratio = grads[0] / grads[-1]
            yield self.finding(
                f"predicted gradient falls {1 / max(ratio, 1e-300):.3g}x from the last weight layer to the first "
                f"({prof.end_to_end_decades:+.1f} decades over {len(layers)} layers); it crosses "
                f"{c.limit:.0e} of the last layer's at layer {c.cross + 1} of {len(layers)} ('{where(node)}'); "
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
                f"predicted gradients shrink toward the input ({prof.end_to_end_decades:+.1f} decades over "
                f"{len(layers)} layers): {rate}; at this rate they reach {c.limit:.0e} of the last layer's "
                f"after {c.reach:.0f} layers (this model has {len(layers)})",
                node=layers[0],
                fix=c.fix,
                severity="warning",
                vanish_depth=c.reach,
                decades_per_layer=prof.decades_per_layer,
            )
