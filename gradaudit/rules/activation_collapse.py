"""GA103 activation-collapse."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.crossings import activation_crossing
from gradaudit.rules.evidence.text import factor_text, fmt, where


@register
class ActivationCollapse(Rule):
    """Predicted activations shrink by 1000x or more across the weight layers.

    ## What it does
    Propagates the mean and second moment of every activation forward from standard
    normal inputs through the model's actual weights, and reports the first weight layer
    whose output RMS is at most 1e-3 of the first weight layer's. The message carries
    both RMS values and the fitted rate (decades per layer). Only the weight layers
    whose output no normalization rescales count: a norm restores the scale, so a
    small output it reads (a residual branch's N(0, 0.02^2) projection summed into a
    Post-LN norm) does not carry on. When `--probe` ran, the measured RMS decides.

    ## Why is this bad?
    Each layer multiplies the second moment of its input by n Var[w] times the
    activation's E[phi(h)^2] / E[h^2]; below 1 the signal decays geometrically. He et
    al. (2015) show that Xavier init before ReLU (n Var[w] = 1) halves the variance at
    every layer: 2^-29 over 30 layers, and their 30-layer network does not learn. Deep
    activations that carry no signal also carry no gradient to the weights that read
    them (dL/dW = dL/dy x^T), and the smallest values underflow in low precision.

    ## Example
    ```python
    layers = []
    for _ in range(30):
        layer = nn.Linear(256, 256, bias=False)
        nn.init.xavier_normal_(layer.weight)        # n Var[w] = 1, ReLU needs 2
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    for _ in range(30):
        layer = nn.Linear(256, 256, bias=False)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")   # n Var[w] = 2
        layers += [layer, nn.ReLU()]
    ```

    ## References
    - He et al., "Delving Deep into Rectifiers", ICCV 2015.
    - Poole et al., "Exponential expressivity in deep neural networks through transient
      chaos", NeurIPS 2016.
    """

    code = "GA103"
    name = "activation-collapse"
    category = "vanishing"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        hit = activation_crossing(analysis, -1)
        if hit is None:
            return
        prof, i, fix = hit
        layers, acts = prof.layers, prof.acts
        first = acts[0]
        node = layers[i]
        yield self.finding(
            f"{prof.source} activation RMS falls from {fmt(first)} at '{where(layers[0])}' to {fmt(acts[i])} at "
            f"'{where(node)}' (layer {i + 1} of {len(layers)}, {factor_text(first / acts[i]) if acts[i] else 'to exactly 0'}"
            f"{' smaller' if acts[i] else ''}); "
            f"{prof.rate_text(i)}",
            node=node,
            fix=fix,
            ratio=acts[i] / first,
            layer_index=i + 1,
        )
