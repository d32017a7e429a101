"""GA101 vanishing-gradients."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import culprit_layer, depth_rate_text


@register
class VanishingGradients(Rule):
    """Predicted gradients shrink by 1000x or more between the output and the first layers.

    ## What it does
    Propagates the second moment of dL/d(activation) backward through every op's
    Jacobian, from the weights the model was initialised with, and reports when the
    gradient reaching the earliest weight layers is at most 1e-3 of the gradient at the
    last weight layer (error), or when the fitted per-layer trend would reach 1e-3
    within twice the model's depth (warning).

    ## Why is this bad?
    The first layers receive almost no gradient: they barely move, so a deep model
    trains like a shallow one, or not at all. In mean-field terms the per-layer gain
    chi_1 = sigma_w^2 E[phi'(h)^2] is below 1 and the gradient decays like chi_1^depth
    (depth scale xi = -1/ln chi_1; networks train roughly when depth < 6 xi).

    ## Example
    ```python
    layers = []
    for _ in range(20):
        layer = nn.Linear(256, 256)
        nn.init.normal_(layer.weight, std=1.0)   # saturates the sigmoid
        layers += [layer, nn.Sigmoid()]
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
    """

    code = "GA101"
    name = "vanishing-gradients"
    category = "vanishing"
    default_severity = "error"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        from gradaudit.propagation.depth import summarize

        layers = [n for n in analysis.weight_layers() if analysis.stat(n.name) is not None]
        if len(layers) < 2:
            return
        grads = [analysis.stat(n.name).grad_rms for n in layers]
        depth = summarize(grads, grads)
        last = grads[-1]
        if last <= 0:
            return
        limit = 10.0 ** (-settings.crossing_decades)
        below = [i for i, g in enumerate(grads) if g <= last * limit]
        if below:
            # the deepest-from-output layer where it has crossed first (closest to output)
            first_cross = max(below)
            node = layers[first_cross]
            ratio = grads[0] / last
            culprit = culprit_layer(analysis, layers)
            yield self.finding(
                f"gradient falls {1 / max(ratio, 1e-300):.3g}x from the last weight layer to the first "
                f"({depth.end_to_end_decades:+.1f} decades over {len(layers)} layers); it crosses 1e-3 of the "
                f"output's at layer {first_cross + 1} of {len(layers)} ('{node.module or node.name}'). "
                f"{depth_rate_text(depth)}",
                node=node,
                fix=culprit[1] if culprit else None,
                ratio=ratio,
                decades=depth.end_to_end_decades,
                layer_index=first_cross + 1,
            )
            return
        if depth.vanish_depth is not None and depth.vanish_depth <= 2 * len(layers):
            node = layers[0]
            culprit = culprit_layer(analysis, layers)
            yield self.finding(
                f"gradients shrink toward the input ({depth.end_to_end_decades:+.1f} decades over {len(layers)} "
                f"layers): {depth_rate_text(depth)}; at this rate they reach 1e-3 of the output's after "
                f"{depth.vanish_depth:.0f} layers",
                node=node,
                fix=culprit[1] if culprit else None,
                severity="warning",
                vanish_depth=depth.vanish_depth,
            )
