"""GA602 dead-units."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register


@register
class DeadUnits(Rule):
    """Many ReLU-family units output exactly zero for most of a real batch.

    ## What it does
    From the probe's first draw, for every ReLU-family activation (ReLU, ReLU6,
    Hardswish, thresholds — the ones with a flat zero region), counts the units (features,
    or channels of a feature map) whose output is exactly 0 for at least 70% of the
    batch (and positions), and reports the activation when at least half of its units are
    dead. Both thresholds are configurable (`dead_fraction`, `dead_units_min`).

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
        for u in probe.units:
            if u.kind != "dead" or u.fraction < need:
                continue
            node = analysis.graph[u.node]
            yield self.finding(
                f"{u.count} of {u.units} units of '{u.node}' [{u.op}] ({u.fraction:.0%}) output 0 for at least "
                f"{per_unit:.0%} of the batch: they pass no gradient there",
                node=node,
                fix="nn.LeakyReLU(0.01)  # or zero the bias / add a normalisation layer before it",
                dead_fraction=u.fraction,
                units=u.units,
            )
