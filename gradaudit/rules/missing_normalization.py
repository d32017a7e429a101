"""GA302 missing-normalization."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.fixes import add_norm_fix
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, layer_grad
from gradaudit.rules.evidence.structure import longest_chain, next_activation
from gradaudit.rules.evidence.text import fmt, where


@register
class MissingNormalization(Rule):
    """A deep plain stack of weight layers with no normalization layer in it.

    ## What it does
    Finds the longest chain of weight layers in which no normalization op
    (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and no residual add lies
    between consecutive layers, and reports it when it has at least ``deep`` (10) weight
    layers. Stacks whose activations are all SELU (self-normalizing networks) are not
    reported.

    ## Why is this bad?
    Without normalization the scale of every activation and gradient rests on the init
    alone: any per-layer gain other than exactly 1 compounds geometrically with depth,
    and training moves the weights away from whatever balance the init had. VGG-style
    plain stacks deeper than ~10 layers needed staged training before BatchNorm; with
    normalization the forward scale is reset at every layer and the network tolerates
    larger learning rates.

    ## Example
    ```python
    layers = []
    for _ in range(12):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    layers = []
    for _ in range(12):
        layers += [nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## References
    - Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
      Reducing Internal Covariate Shift", ICML 2015.
    - Ba, Kiros & Hinton, "Layer Normalization", 2016.
    - Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015 (staged
      training of plain stacks).
    - Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017 (SELU).
    """

    code = "GA302"
    name = "missing-normalization"
    category = "normalization"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        chain = longest_chain(analysis, allow_norm=False, allow_residual=False)
        if len(chain) < settings.deep:
            return
        acts = [a for a in (next_activation(analysis, n) for n in chain[:-1]) if a is not None]
        if acts and all(a == "selu" for a in acts):
            return
        s0, s1 = analysis.stat(chain[0].name), analysis.stat(chain[-1].name)
        yield self.finding(
            f"{len(chain)} weight layers form a plain stack with no normalization layer ('{where(chain[0])}' to "
            f"'{where(chain[-1])}'): their scale rests on the init alone (predicted activation RMS "
            f"{fmt(s0.act_rms)} -> {fmt(s1.act_rms)}, {GRADIENT_NAME} {fmt(layer_grad(analysis, chain[0]))} -> "
            f"{fmt(layer_grad(analysis, chain[-1]))} from the first to the last)",
            node=chain[0],
            fix=add_norm_fix(chain[0]) + "  # and after each hidden layer",
            layers=len(chain),
        )
