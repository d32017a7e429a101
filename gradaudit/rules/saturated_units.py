"""GA603 saturated-units."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.text import listing, where


@register
class SaturatedUnits(Rule):
    """Most pre-activations of a sigmoid or tanh sit in its flat tails on a real batch.

    ## What it does
    From the probe's first draw, measures for every sigmoid, tanh, hard-tanh and
    soft-sign the fraction of its input entries with |x| >= 5, and reports the
    activations where more than half are (DeepDiagnosis's thresholds; configurable as
    `saturation_abs` and `saturation_fraction`) in one finding that lists them with
    their fractions.

    ## Why is this bad?
    At |x| = 5, sigmoid'(x) = 0.0066 and tanh'(x) = 1.8e-4: a saturated unit passes
    almost no gradient, so the layers below it barely learn, and stacking saturated
    layers multiplies these factors (Glorot & Bengio 2010).

    ## Example
    ```python
    layer = nn.Linear(256, 256)
    nn.init.normal_(layer.weight, std=1.0)   # pre-activations of scale 16
    model = nn.Sequential(layer, nn.Tanh())
    ```

    ## Use instead
    ```python
    nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh"))
    model = nn.Sequential(layer, nn.LayerNorm(256), nn.Tanh())
    ```

    ## References
    - Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS 2010.
    - Wardat et al., "DeepDiagnosis", ICSE 2022.
    """

    code = "GA603"
    name = "saturated-units"
    category = "saturation"
    default_severity = "warning"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        from gradaudit.probe.thresholds import threshold

        probe = analysis.config.get("probe")
        if probe is None:
            return
        settings = analysis.config.get("settings")
        limit = threshold(settings, "saturation_fraction")
        level = threshold(settings, "saturation_abs")
        hot = [u for u in probe.units if u.kind == "saturated" and u.fraction > limit]
        if not hot:
            return
        nodes = [analysis.graph[u.node] for u in hot]
        listed = [f"'{where(n)}' ({u.fraction:.0%})" for n, u in zip(nodes, hot)]
        yield self.finding(
            f"{len(hot)} activation(s) have most pre-activations at |x| >= {level:g}, where the derivative is nearly "
            f"0: {listing(listed)}",
            node=nodes[0],
            fix="nn.LayerNorm(features)  # before the activation, or a smaller init gain",
            layers=[where(n) for n in nodes],
            saturated_fraction=max(u.fraction for u in hot),
        )
