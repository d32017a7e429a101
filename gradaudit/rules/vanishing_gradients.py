"""GA101 vanishing-gradients."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules import _gradient_trend
from gradaudit.rules.base import Finding, Rule, register


@register
class VanishingGradients(Rule):
    """Gradients shrink by 1000x or more from the last weight layer to the first ones.

    ## What it does
    Judges the *weight-gradient scale* of every weight layer, G = sqrt(P) x RMS of
    dL/d(output), P the positions per sample that share each weight (spatial positions
    of a conv, sequence positions of a linear layer; 1 in an MLP): dL/dW sums over
    them, so a global average pool, which divides each position's gradient by P, does
    not read as vanishing. The per-layer table's `layer grad` column, the headline and
    this rule all quote this one quantity. The figure judged is the change of G from the
    last weight layer to the first, estimated from the medians of the last and the
    first quarter of the weight layers and scaled to the model's depth (in a model of
    fewer than 8 weight layers, the last and the first layer themselves). Gradients
    that vanish or explode compound with depth; comparing groups keeps one layer's
    structural dip (a projection behind a LayerNorm over a
    large residual stream, a classifier on pooled features) from reading as one. Error:
    the gradient falls past 1e-3 that way (the message names the layer nearest the
    output already past it). Warning: short of that, it already changes by 100x (a
    trend extrapolated past the model's own depth is never reported).
    The profile judged is the probe's measurement when `--probe` ran, else the
    prediction (second moments of dL/d(activation) propagated backward through every
    op's Jacobian, from the weights the model was initialised with). Zero- or
    small-initialised gates that a design closes on purpose (a zero head, layer scale,
    adaLN-Zero, Fixup; see GA205) are judged opened: a what-if with every gate at unit
    gain at once, so past the limit there the finding is a warning, not an error.

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
        yield from _gradient_trend.check(self, analysis, -1)
