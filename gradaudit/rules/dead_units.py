"""GA602 dead-units."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.text import listing, where


@register
class DeadUnits(Rule):
    """Many ReLU-family units output exactly zero for most of a real batch.

    ## What it does
    From the probe's first draw, for every ReLU-family activation (ReLU, ReLU6,
    Hardswish, thresholds — the ones with a flat zero region), counts the units (features,
    or channels of a feature map) whose output is exactly 0 for at least 70% of the
    batch (and positions), and reports the activations where at least half of the units
    are dead, in one finding that lists them. Both thresholds are configurable
    (`dead_fraction`, `dead_units_min`). A unit is only judged on at least 32
    observations (`dead_min_samples`; batch x positions): a live ReLU unit is zero half
    the time, and on 8 observations it reads as 70% zero with probability 0.14 — the
    4-8-unit squeeze-and-excitation bottlenecks of mobile networks, fed one pooled value
    per sample, would read as dead from sampling noise alone (on 32 observations that
    probability is 0.01).

    ## Why is this bad?
    A unit that is zero on most inputs passes no gradient on those inputs (ReLU's
    derivative is 0 there): its incoming weights stop learning and the layer's
    effective width shrinks. DeepDiagnosis calls a layer dead at 70% non-positive
    outputs; AUTOTRAINER flags dying ReLU at 70% zero gradients. Large negative biases,
    too large a learning rate, or inputs with a large common offset cause it.

    ## Example
    ```python
    layer = nn.Linear(256, 256)
    nn.init.constant_(layer.bias, -3.0)   # most pre-activations negative
    model = nn.Sequential(layer, nn.ReLU())
    ```

    ## Use instead
    ```python
    nn.init.zeros_(layer.bias)
    model = nn.Sequential(layer, nn.LeakyReLU(0.01))   # or normalise before the ReLU
    ```

    ## References
    - Wardat et al., "DeepDiagnosis: Automatically Diagnosing Faults and Recommending
      Actionable Fixes in Deep Learning Programs", ICSE 2022.
    - Zhang et al., "AUTOTRAINER: An Automatic DNN Training Problem Detection and Repair
      System", ICSE 2021.
    - Lu et al., "Dying ReLU and Initialization: Theory and Numerical Examples", 2019.
    """

    code = "GA602"
    name = "dead-units"
    category = "dead-units"
    default_severity = "warning"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        from gradaudit.probe.thresholds import threshold

        probe = analysis.config.get("probe")
        if probe is None:
            return
        settings = analysis.config.get("settings")
        need = threshold(settings, "dead_units_min")
        per_unit = threshold(settings, "dead_fraction")
        min_samples = threshold(settings, "dead_min_samples")
        dead = [u for u in probe.units if u.kind == "dead" and u.fraction >= need and u.samples >= min_samples]
        if not dead:
            return
        nodes = [analysis.graph[u.node] for u in dead]
        listed = [f"'{where(n)}' ({u.count} of {u.units})" for n, u in zip(nodes, dead)]
        yield self.finding(
            f"{len(dead)} activation(s) have most units dead, outputting 0 for at least {per_unit:.0%} of the batch: "
            f"{listing(listed)}; they pass no gradient there",
            node=nodes[0],
            fix="nn.LeakyReLU(0.01)  # or zero the bias / add a normalisation layer before it",
            layers=[where(n) for n in nodes],
            units=[u.units for u in dead],
            dead_fraction=max(u.fraction for u in dead),
        )
