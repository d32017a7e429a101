"""GA102 exploding-gradients."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules import _gradient_trend
from gradaudit.rules.base import Finding, Rule, register


@register
class ExplodingGradients(Rule):
    """Gradients grow by 1000x or more from the last weight layer to the first ones.

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
    the gradient grows past 1e3 that way (the message names the layer nearest the
    output already past it). Warning: short of that, it already changes by 100x (a
    trend extrapolated past the model's own depth is never reported).
    Only the weight layers whose output no normalization rescales count here: a layer
    followed by BatchNorm/LayerNorm is scale-invariant, and a large gradient grows its
    weight norm, which shrinks its next steps (Arora, Li & Lyu, ICLR 2019), so stock
    BatchNorm CNNs — whose first convolutions get 100-1000x the classifier's weight
    gradient — are not reported. The terms of a sum that only norms read (directly or
    through further sums with one reader each) count as followed by one: BERT's word,
    position and token-type embeddings, N(0, 0.02^2), into their LayerNorm, or a
    Post-LN block's `norm(x + f(x))`; not a Pre-LN residual stream, which is also
    carried on as it is.
    The profile judged is the probe's measurement when `--probe` ran, else the
    prediction (second moments of dL/d(activation) propagated backward through every
    op's Jacobian, from the weights the model was initialised with). Zero- or
    small-initialised gates that a design closes on purpose (a zero head, layer scale,
    adaLN-Zero, Fixup; see GA205) are judged opened: a what-if with every gate at unit
    gain at once, so past the limit there the finding is a warning, not an error.

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
        yield from _gradient_trend.check(self, analysis, +1)
